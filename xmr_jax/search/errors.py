"""The search package's errors: bad user input, named in the message (the CLI exits with 2)."""


class SearchError(ValueError):
    """Bad search input (folder, image, index, query or ground truth) with a message naming it."""


class IndexMismatchError(SearchError):
    """The index was built with a different model than the one used to query it."""
