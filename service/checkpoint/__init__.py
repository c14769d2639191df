"""Preemption-safe checkpoints, one concern a module:

- ``store``: the commit protocol over storage (pointer, manifest, verify, prune);
- ``committer``: uploads in the background, at most one in flight;
- ``resume``: what a resumed attempt must keep (the data order), and where it resumes from;
- ``safepoint``: when to checkpoint or stop inside the training loop, and the stop itself.
"""
