"""A loop run's ``state.json``: read and checked, so a damaged file is named, not a traceback.

The file records the steps a run has finished (``done``), their log (``log``) and what
the pool holds (``num_classes``, ``classes``); the loop and ``jobs/import_labels.py``
both read it. Kept free of torch and Ray so the import job stays light.
"""

from __future__ import annotations

import json
from typing import Any

from segrl.data.labels import DataError

STATE_FILE = "state.json"


def new_state() -> dict[str, Any]:
    return {"status": "running", "done": [], "log": []}


def loop_state_problem(state: dict[str, Any]) -> str | None:
    """What the loop cannot use in a state.json object, or None."""
    for key in ("done", "log"):
        if not isinstance(state.get(key), list):
            return f"key '{key}' is {'missing' if key not in state else repr(state[key])}, expected a list"
    if not all(isinstance(step, str) for step in state["done"]):
        return "key 'done' must list step names like \"00/select\""
    if "classes" in state and not isinstance(state["classes"], list):
        return f"key 'classes' is {state['classes']!r}, expected a list of class names"
    return None


def damaged(uri: str, problem: str) -> DataError:
    return DataError(
        f"{uri} is damaged: {problem}. It records which steps of the run are done and the pool's "
        "classes; restore it from a backup (or a copy of the run folder), or start the run afresh "
        "under a new name (run=...); the rounds/ folders it describes are left as they are"
    )


def read_state_object(store: Any) -> dict[str, Any]:
    """state.json decoded, or ``DataError`` when it is empty, not JSON or not an object."""
    uri = store.uri(STATE_FILE)
    data = store.read_bytes(STATE_FILE)
    try:
        state = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(uri, "it is empty (0 bytes)" if not data.strip() else f"it is not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise damaged(uri, f"it holds a JSON {type(state).__name__}, not an object")
    return state


def read_state(store: Any) -> dict[str, Any]:
    """The loop's state; a fresh one when the run has none yet; ``DataError`` when damaged.

    The error names the file and what is wrong, and says how to recover: the loop writes
    the file atomically after every step, so a damaged one was broken by a disk or a hand.
    """
    if not store.exists(STATE_FILE):
        return new_state()
    state = read_state_object(store)
    problem = loop_state_problem(state)
    if problem:
        raise damaged(store.uri(STATE_FILE), problem)
    return state
