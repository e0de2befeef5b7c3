"""The core both serving modes share (pure, no server): outcome -> response error, the checks a
parsed request must pass, and the cancellation-poll clock."""

import numpy as np

from triton_diffusion.core import (CANCELLED, INTERNAL, INVALID_ARG, Failed, Images, PollClock, Rejected, admit,
                                   response_error)
from triton_diffusion.requests import ParsedRequest, RequestError, text_to_image


def test_each_outcome_becomes_one_response_the_same_in_both_modes():
    assert response_error(Images((np.zeros((2, 2, 3), np.uint8),), (1,))) is None
    assert response_error(Rejected("HEIGHT=100 is bad")) == (INVALID_ARG, "HEIGHT=100 is bad")
    assert response_error(Failed("out of memory")) == (INTERNAL, "out of memory")
    assert response_error(CANCELLED) == ("CANCELLED", "request cancelled")


def test_admit_returns_the_first_reason_a_check_gives_for_any_item():
    items = (text_to_image("a", 1, 4, 1.0, 64, 64), text_to_image("b", 2, 4, 1.0, 64, 64))
    parsed = ParsedRequest(items)
    assert admit(parsed) is parsed
    assert admit(parsed, lambda item: None) is parsed
    refused = admit(parsed, lambda item: None, lambda item: f"not {item.prompt}" if item.prompt == "b" else None)
    assert isinstance(refused, RequestError) and str(refused) == "not b"
    error = RequestError("already invalid")
    assert admit(error, lambda item: "never asked") is error


def test_the_poll_clock_is_due_once_per_interval():
    now = [0.0]
    clock = PollClock(1.0, clock=lambda: now[0])
    assert not clock.due()  # a call polls after its first interval
    now[0] = 1.0
    assert clock.due() and not clock.due()
    now[0] = 1.5
    assert not clock.due()
    now[0] = 2.0
    assert clock.due()
    assert PollClock(1.0, clock=lambda: 0.0, start_due=True).due()
    every_time = PollClock(0.0, clock=lambda: 5.0)
    assert every_time.due() and every_time.due()
