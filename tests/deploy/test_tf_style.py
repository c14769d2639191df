"""tools/tf_style.py: the stand-in for `terraform fmt -check` must catch what fmt fixes."""

from __future__ import annotations

from deploy_support import load_tools_module

GOOD = """\
resource "aws_s3_bucket" "this" {
  bucket        = var.bucket_name
  force_destroy = false

  tags = merge(var.tags, { Name = "x" })
  policy = jsonencode({
    Version = "2012-10-17"
  })

  for_each = toset([
    "a",
  ])
  user_data = <<-EOT
      anything = goes
  EOT
}
"""


def style():
    return load_tools_module("tf_style")


def test_accepts_fmt_output() -> None:
    assert style().check(GOOD) == []


def test_flags_misaligned_equals() -> None:
    bad = GOOD.replace("bucket        = var", "bucket = var")
    problems = style().check(bad)
    assert any("not aligned" in p for p in problems)


def test_flags_wrong_indent_tabs_and_trailing_space() -> None:
    problems = style().check(GOOD.replace('    "a",', '   "a",  ').replace("  tags", "\ttags"))
    assert any("indented 3 spaces, expected 4" in p for p in problems)
    assert any("trailing whitespace" in p for p in problems)
    assert any("tab" in p for p in problems)


def test_fix_is_idempotent_and_produces_clean_text() -> None:
    bad = GOOD.replace("bucket        = var", "bucket = var").replace('    "a",', '      "a",')
    fixed = style().fix(bad)
    assert fixed == GOOD
    assert style().fix(fixed) == fixed
