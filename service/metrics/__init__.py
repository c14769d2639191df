"""Metrics: ``registry`` defines them and carries them out (served and pushed), ``push`` talks
to the Pushgateway, ``callback`` feeds them from the training loop. Importing the package
imports neither transformers nor torch."""
