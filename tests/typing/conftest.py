# The filters under cases/ are inputs for mypy, not tests: never import or collect them.
collect_ignore = ["cases"]
