"""Test helpers: the accuracy check lives in selfattn.testing (also used by `python -m selfattn`)."""
from selfattn.testing import (  # noqa: F401
    ATOL_FLOOR,
    assert_close_to_golden,
    check_against_reference,
    max_err,
    rand,
)
