"""Checking the service's error answers: RFC 9457 problem details (cxr.serve.problems)."""

from __future__ import annotations

from cxr.serve.problems import MEDIA_TYPE, Problem


def problem_detail(response) -> str:
    """The ``detail`` of an error answer, after checking that the answer is a problem: its
    media type, its fields (nothing else), its status repeated, and ``errors`` on 422 only."""
    assert response.headers["content-type"] == MEDIA_TYPE, response.headers
    body = Problem.model_validate(response.json())
    assert body.status == response.status_code, body
    assert (body.errors is not None) == (response.status_code == 422), body
    return body.detail
