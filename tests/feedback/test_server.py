"""The feedback server: tokens, validation (4xx, store unchanged), escaping, kill -9 durability, the
simulated rater end to end. Skipped without FastAPI (pip install 'rlfb[feedback]')."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the feedback server needs pip install 'rlfb[feedback]'")
pytest.importorskip("httpx", reason="the feedback server tests need httpx (pip install 'rlfb[feedback]')")

from fastapi.testclient import TestClient  # noqa: E402

from rlfb.feedback.items import ItemPool  # noqa: E402
from rlfb.feedback.judgments import MAX_BODY_BYTES, MAX_TEXT_CHARS  # noqa: E402
from rlfb.feedback.server import ServerSettings, create_app  # noqa: E402
from rlfb.feedback.simulated import SimulatedRater, free_port, start_grammar_server  # noqa: E402
from rlfb.feedback.store import FeedbackStore, Item  # noqa: E402

URL = "http://127.0.0.1"
SCRIPT = "<script>alert('x')</script>"


class FixedSource:
    """Completions chosen by the test."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def refresh(self) -> None:
        pass

    @property
    def version(self) -> tuple[str, int | None]:
        return "fixed", 3

    def complete(self, prompts: Any, num_samples: int) -> list[list[str]]:
        return [self.texts[:num_samples] for _ in prompts]


@pytest.fixture
def server(tmp_path: Path) -> Any:
    store = FeedbackStore(tmp_path / "store.sqlite")
    token = store.add_rater("ada")
    pool = ItemPool(store, FixedSource([f" {SCRIPT} great", " bad"]), ["The film was"], pair_fraction=0.0,
                    capacity=4)
    pool.fill_once()
    client = TestClient(create_app(store, pool, ServerSettings(wait_s=0.5)), base_url=URL)
    client.headers["Authorization"] = f"Bearer {token}"
    return client, store, pool


def test_the_page_shows_model_text_as_text_never_as_html(server: Any) -> None:
    client, _, _ = server
    item = client.get("/api/next").json()
    assert item["completions"] == [f" {SCRIPT} great"]  # the text itself, as JSON data
    page = client.get("/")
    assert SCRIPT not in page.text and "<script src=\"/static/app.js\" defer></script>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script could run
    script = client.get("/static/app.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "body.textContent = text" in script and "$(\"prompt\").textContent = item.prompt" in script


def test_a_token_is_required_and_must_be_known(server: Any) -> None:
    client, store, _ = server
    anonymous = TestClient(client.app, base_url=URL)
    assert anonymous.get("/api/next").status_code == 401
    wrong = anonymous.get("/api/next", headers={"Authorization": "Bearer not-a-token"})
    assert wrong.status_code == 401 and "unknown rater token" in wrong.json()["error"]
    assert anonymous.get("/api/health").json() == {"ok": True}
    other_host = TestClient(client.app, base_url="http://attacker.example")
    assert other_host.get("/api/next", headers=client.headers).status_code == 421


def _bad_requests(item_id: str, pair_id: str) -> dict[str, tuple[Any, int]]:
    """name -> (body, expected status); a body of bytes is sent raw as application/json."""
    good = {"item_id": item_id, "kind": "binary", "value": {"label": 1}}
    return {
        "not json": (b"{label: 1", 400),
        "a json list": (b"[1, 2]", 400),
        "NaN rating": (b'{"item_id": "%s", "kind": "rating", "value": {"rating": NaN}}' % item_id.encode(), 400),
        "oversized body": (b'{"item_id": "' + b"x" * MAX_BODY_BYTES + b'"}', 413),
        "oversized edit": ({**good, "kind": "edit", "value": {"text": "y" * (MAX_TEXT_CHARS + 1)}}, 413),
        "missing item_id": ({"kind": "binary", "value": {"label": 1}}, 422),
        "missing kind": ({"item_id": item_id, "value": {"label": 1}}, 422),
        "missing value": ({"item_id": item_id, "kind": "binary"}, 422),
        "unknown kind": ({**good, "kind": "stars"}, 422),
        "unknown field": ({**good, "path": "/etc/passwd"}, 422),
        "value field of another kind": ({**good, "value": {"label": 1, "rating": 3}}, 422),
        "label not 0 or 1": ({**good, "value": {"label": 2}}, 422),
        "label a boolean": ({**good, "value": {"label": True}}, 422),
        "rating off the scale": ({**good, "kind": "rating", "value": {"rating": 9}}, 422),
        "rating a string": ({**good, "kind": "rating", "value": {"rating": "5"}}, 422),
        "edit not a string": ({**good, "kind": "edit", "value": {"text": 5}}, 422),
        "edit with control characters": ({**good, "kind": "edit", "value": {"text": "a\x00b"}}, 422),
        "choice on a one-completion item": ({**good, "kind": "choice", "value": {"chosen": 0}}, 422),
        "binary on a pair item": ({**good, "item_id": pair_id}, 422),
        "item_id not a string": ({**good, "item_id": 7}, 422),
        "item_id too long": ({**good, "item_id": "i" * 65}, 422),
        "unknown item": ({**good, "item_id": "no-such-item"}, 404),
    }


def test_bad_judgments_get_a_4xx_with_a_message_and_leave_the_store_unchanged(server: Any) -> None:
    client, store, _ = server
    store.add_items([Item("pair1", "P", [" a", " b"], "fixed", 3, "pair")])
    item_id = client.get("/api/next").json()["item_id"]
    rows_before = store.count()
    cases = _bad_requests(item_id, "pair1")
    assert len(cases) >= 15
    for name, (body, status) in cases.items():
        if isinstance(body, bytes):
            response = client.post("/api/judgments", content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.post("/api/judgments", json=body)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        assert response.json()["error"], name
        assert store.count() == rows_before, name
    as_form = client.post("/api/judgments", content=b"item_id=x", headers={"Content-Type": "text/plain"})
    assert as_form.status_code == 415 and store.count() == rows_before
    wrong_token = TestClient(client.app, base_url=URL).post(
        "/api/judgments", json={"item_id": item_id, "kind": "binary", "value": {"label": 1}},
        headers={"Authorization": "Bearer nope"})
    assert wrong_token.status_code == 401 and store.count() == rows_before
    good = client.post("/api/judgments", json={"item_id": item_id, "kind": "binary", "value": {"label": 1}})
    assert good.status_code == 201 and store.count() == rows_before + 1
    again = client.post("/api/judgments", json={"item_id": item_id, "kind": "binary", "value": {"label": 0}})
    assert again.status_code == 409 and store.count() == rows_before + 1


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_a_judgment_is_stored_once_whether_committed_on_the_event_loop_or_in_a_thread(
        tmp_path: Path, synchronous: str) -> None:
    # NORMAL commits on the event loop (no thread hop); FULL waits for an fsync in a worker thread.
    store = FeedbackStore(tmp_path / "store.sqlite", synchronous=synchronous)
    token = store.add_rater("ada")
    pool = ItemPool(store, FixedSource([" fine", " ok"]), ["P"], pair_fraction=0.0, capacity=2, batch_size=2)
    pool.fill_once()
    client = TestClient(create_app(store, pool, ServerSettings(wait_s=0.5)), base_url=URL,
                        headers={"Authorization": f"Bearer {token}"})
    item = client.get("/api/next").json()
    answer = client.post("/api/judgments", json={"item_id": item["item_id"], "kind": "binary",
                                                 "value": {"label": 1}, "request_id": "r"})
    assert answer.status_code == 201 and answer.json()["progress"]["rater_judgments"] == 1
    assert [(j.item_id, j.value) for j in FeedbackStore(tmp_path / "store.sqlite").judgments()] == \
        [(item["item_id"], {"label": 1})]
    assert client.get("/api/next").json()["item_id"] != item["item_id"]


def test_a_rater_keeps_their_item_until_they_judge_it_and_progress_counts(server: Any) -> None:
    client, _, _ = server
    first = client.get("/api/next").json()
    assert client.get("/api/next").json()["item_id"] == first["item_id"]  # a reload shows the same item
    answer = client.post("/api/judgments", json={"item_id": first["item_id"], "kind": "rating",
                                                 "value": {"rating": 4}, "request_id": "r1"})
    assert answer.status_code == 201 and answer.json()["progress"]["rater_judgments"] == 1
    retried = client.post("/api/judgments", json={"item_id": first["item_id"], "kind": "rating",
                                                  "value": {"rating": 4}, "request_id": "r1"})
    assert retried.status_code == 200 and retried.json() == {**answer.json(), "duplicate": True}
    assert client.get("/api/next").json()["item_id"] != first["item_id"]


def test_an_acknowledged_judgment_survives_kill_9_of_the_server(tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    token = FeedbackStore(store_path).add_rater("ada")
    port = free_port()
    process = start_grammar_server(store_path, port)
    try:
        report = SimulatedRater(f"http://127.0.0.1:{port}", token, seed=1).run(30)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    stored = {judgment.id: judgment for judgment in FeedbackStore(store_path).judgments()}
    assert len(report.acknowledged) == 30 and set(report.acknowledged) <= set(stored)


def test_simulated_rater_end_to_end_on_rlfb_tiny(tmp_path: Path) -> None:
    from rlfb.feedback.exchange import export_rows
    from rlfb.feedback.items import PolicySource
    from rlfb.models.policy import Policy
    from rlfb.models.sampler import SamplingConfig
    from rlfb.rewards.builtin import vader_compound

    policy = Policy.from_pretrained("rlfb-tiny", value_head=False, device="cpu")
    store = FeedbackStore(tmp_path / "store.sqlite")
    token = store.add_rater("sim")
    source = PolicySource(policy, SamplingConfig(max_new_tokens=12), seed=0)
    pool = ItemPool(store, source, ["The film was", "The food was"], pair_fraction=0.5, capacity=8, batch_size=8)
    client = TestClient(create_app(store, pool), base_url=URL)
    pool.start()
    try:
        report = SimulatedRater(URL, token, noise=0.0, seed=0, client=client).run(16)
    finally:
        pool.stop()
    judgments = list(store.judgments())
    assert [j.id for j in judgments] == report.acknowledged and {j.policy_version for j in judgments} == {"base"}
    for judgment in judgments:  # noise 0: every judgment is VADER's
        scores = [vader_compound(text) for text in judgment.completions]
        if judgment.kind == "binary":
            assert judgment.value["label"] == int(scores[0] > 0)
        elif judgment.kind == "choice" and scores[0] != scores[1]:
            assert judgment.value["chosen"] == int(scores[1] > scores[0])
        elif judgment.kind == "edit":
            assert vader_compound(judgment.value["text"]) >= scores[0]
    assert len(export_rows(store, "pairwise")) + len(export_rows(store, "pointwise")) \
        + len(export_rows(store, "rating")) + len(export_rows(store, "sft")) >= 16
