"""Human preference study: statistics against scipy, the vote store's guarantees, the HTTP API's error handling, and
the whole flow in a real headless Chromium, across a crash and restart of the server."""
import csv
import io
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from wsgiref.util import setup_testing_defaults

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from scipy import optimize, stats

from metrics.human.__main__ import main as human_main
from metrics.human.server import HumanEvalApp, QuietHandler, make_app_server
from metrics.human.stats import Outcome, bradley_terry, wilson_interval, win_rates
from metrics.human.store import Store, VoteError
from browser import Browser, find_browser

# --- statistics ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("successes, trials", [(0, 10), (3, 10), (10, 10), (57, 100), (1, 1)])
def test_wilson_interval_matches_scipy(successes, trials):
    expected = stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_wilson_interval_without_trials_is_uninformative():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rates_count_ties_as_half_a_win():
    outcomes = [Outcome("a", "b", "a"), Outcome("a", "b", None), Outcome("b", "a", "b"), Outcome("a", "c", "a")]
    rates = win_rates(outcomes)
    assert rates["a"] == {"comparisons": 4, "wins": 2, "losses": 1, "ties": 1, "win_rate": 2.5 / 4,
                          "ci95": list(wilson_interval(2.5, 4))}
    assert rates["c"]["win_rate"] == 0.0 and rates["b"]["win_rate"] == pytest.approx(1.5 / 3)


def simulated_votes(strengths: dict[str, float], votes: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    names, outcomes = sorted(strengths), []
    for _ in range(votes):
        first, second = rng.sample(names, 2)
        p_first = 1 / (1 + np.exp(strengths[second] - strengths[first]))
        roll = rng.random()
        winner = None if abs(roll - p_first) < 0.05 else (first if roll < p_first else second)
        outcomes.append(Outcome(first, second, winner))
    return outcomes


def maximum_likelihood(outcomes: list[Outcome], names: list[str], prior_ties: float) -> dict[str, float]:
    """The Bradley–Terry likelihood maximised by a general-purpose optimiser (ties and virtual ties as half wins)."""
    index = {n: i for i, n in enumerate(names)}
    wins = np.zeros((len(names), len(names)))  # wins[i, j]: i over j
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j:
                wins[i, j] = prior_ties / 2
    for o in outcomes:
        i, j = index[o.first], index[o.second]
        if o.winner is None:
            wins[i, j] += 0.5
            wins[j, i] += 0.5
        else:
            winner, loser = (i, j) if o.winner == o.first else (j, i)
            wins[winner, loser] += 1

    def negative_log_likelihood(theta):
        difference = theta[:, None] - theta[None, :]
        return -np.sum(wins * -np.logaddexp(0, -difference))

    theta = optimize.minimize(negative_log_likelihood, np.zeros(len(names)), method="BFGS",
                              options={"gtol": 1e-10}).x
    return {n: theta[index[n]] - theta.mean() for n in names}


@pytest.mark.parametrize("prior_ties", [0.0, 1.0])
def test_bradley_terry_mm_iteration_reaches_the_maximum_likelihood(prior_ties):
    outcomes = simulated_votes({"a": 0.0, "b": 0.7, "c": -0.5, "d": 1.5}, votes=300, seed=1)
    ours = bradley_terry(outcomes, prior_ties=prior_ties)
    expected = maximum_likelihood(outcomes, sorted(ours), prior_ties)
    assert ours == pytest.approx(expected, abs=1e-5)
    assert sum(ours.values()) == pytest.approx(0, abs=1e-12)
    assert sorted(ours, key=ours.get) == ["c", "a", "b", "d"]  # 300 votes recover the order of the true strengths


def test_bradley_terry_stays_finite_when_a_model_never_wins():
    outcomes = [Outcome("a", "b", "a")] * 5 + [Outcome("b", "c", "b")] * 3
    strengths = bradley_terry(outcomes)
    assert strengths["a"] > strengths["b"] > strengths["c"] and np.isfinite(list(strengths.values())).all()
    with pytest.raises(ValueError, match="c never won"):
        bradley_terry(outcomes, prior_ties=0)


# --- the store -----------------------------------------------------------------------------------------------------


@pytest.fixture
def study(tmp_path) -> Store:
    store = Store(tmp_path / "votes.sqlite")
    for model in ("base", "tuned", "other"):
        store.add_images(model, [(f"{i}.png", str(tmp_path / model / f"{i}.png"), f"prompt {i}") for i in range(2)])
    return store


def test_each_vote_is_committed_and_survives_reopening(study):
    task = study.next_task("alice", random.Random(0))
    assert study.record_vote(task.token, "alice", "left") == 1
    reopened = Store(study.path)  # another process after a crash sees the same votes
    assert [v["choice"] for v in reopened.votes()] == ["left"]
    assert reopened.votes()[0]["prompt"] == task.prompt


def test_duplicate_foreign_and_malformed_votes_are_rejected_and_not_stored(study):
    task = study.next_task("alice", random.Random(0))
    study.record_vote(task.token, "alice", "tie")
    for token, rater, choice, status, message in [
            (task.token, "alice", "left", 409, "already has a vote"),
            (task.token, "bob", "left", 400, "handed to rater 'alice'"),
            ("no-such-token", "alice", "left", 404, "never handed out"),
            (task.token, "alice", "both", 400, "choice must be one of")]:
        with pytest.raises(VoteError, match=message) as error:
            study.record_vote(token, rater, choice)
        assert error.value.status == status
    assert [v["choice"] for v in study.votes()] == ["tie"]


def test_tasks_spread_votes_evenly_and_never_repeat_a_pair_for_a_rater(study):
    rng = random.Random(1)
    seen = []
    while (task := study.next_task("alice", rng)) is not None:
        assert study.task_image(task.token, "left") != study.task_image(task.token, "right")
        study.record_vote(task.token, "alice", "left")
        seen.append(task.item)
    assert len(seen) == 2 * 3  # 2 prompts x 3 model pairs, each once
    votes = study.votes()
    pairs = {(v["item"], *sorted((v["left_model"], v["right_model"]))) for v in votes}
    assert len(pairs) == 6
    # A second rater starts with the pairs that have the fewest votes; all have one, so any; sides are shuffled.
    sides = {(v["left_model"], v["right_model"]) for v in votes}
    assert len(sides) > 3


def test_csv_export_has_one_row_per_vote_with_the_winner(study):
    rng = random.Random(2)
    choices = ["left", "right", "tie"]
    tasks = [study.next_task("carol", rng) for _ in choices]
    for task, choice in zip(tasks, choices):
        study.record_vote(task.token, "carol", choice)
    buffer = io.StringIO()
    assert study.export_csv(buffer) == 3
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [r["choice"] for r in rows] == choices
    assert rows[0]["winner"] == rows[0]["left_model"] and rows[1]["winner"] == rows[1]["right_model"]
    assert rows[2]["winner"] == "tie" and all(r["rater"] == "carol" for r in rows)


# --- the HTTP API, called as a WSGI application ---------------------------------------------------------------------


def call(app, method: str, path: str, body: bytes = b"", query: str = "") -> tuple[int, dict | bytes]:
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    setup_testing_defaults(environ)
    status = []
    payload = b"".join(app(environ, lambda s, headers: status.append(s)))
    code = int(status[0].split()[0])
    return code, json.loads(payload) if payload.startswith(b"{") else payload


def test_api_hides_the_models_and_rejects_bad_submissions_with_clear_messages(study, tmp_path):
    for model in ("base", "tuned", "other"):
        (tmp_path / model).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / model / f"{i}.png")
    app = HumanEvalApp(study, seed=0)
    code, task = call(app, "GET", "/api/next", query="rater=dave")
    assert code == 200 and set(task) == {"token", "prompt", "left", "right"}
    assert not any(model in json.dumps(task) for model in ("base", "tuned", "other"))
    code, image = call(app, "GET", task["left"])
    assert code == 200 and image.startswith(b"\x89PNG")
    vote = {"token": task["token"], "rater": "dave", "choice": "right"}
    for body, expected_code, message in [
            (b"not json", 400, "must be JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (json.dumps({"token": task["token"], "rater": "dave"}).encode(), 400, "choice"),
            (json.dumps({**vote, "rater": " "}).encode(), 400, "rater id"),
            (b"x" * 20_000, 413, "small JSON object")]:
        code, answer = call(app, "POST", "/api/vote", body)
        assert code == expected_code and message in answer["error"]
    assert call(app, "POST", "/api/vote", json.dumps(vote).encode()) == (200, {"ok": True, "votes": 1})
    code, answer = call(app, "POST", "/api/vote", json.dumps(vote).encode())
    assert code == 409 and "first one stands" in answer["error"]
    assert call(app, "GET", "/api/vote")[0] == 405
    assert call(app, "GET", "/image/unknown/left")[0] == 404
    assert call(app, "GET", "/api/next")[0] == 400  # no rater id
    code, results = call(app, "GET", "/api/results")
    assert results["votes"] == 1 and set(results["models"]) == {"base", "tuned", "other"}


def test_nested_brackets_and_a_negative_length_are_refused_with_400(study):
    app = HumanEvalApp(study, seed=0)
    code, answer = call(app, "POST", "/api/vote", b"[" * 9_800)  # deeper than the JSON decoder's stack
    assert code == 400 and "must be JSON" in answer["error"]
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/vote", "CONTENT_LENGTH": "-1",
               "wsgi.input": io.BytesIO(b"{}")}
    setup_testing_defaults(environ)
    status = []
    answer = json.loads(b"".join(app(environ, lambda s, headers: status.append(s))))
    assert status[0].startswith("400") and "Content-Length must be the body's size" in answer["error"]


def _read_until_closed(connection: socket.socket) -> str:
    chunks = []
    while chunk := connection.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_a_body_shorter_than_its_content_length_frees_the_thread_after_the_read_timeout(study, monkeypatch):
    monkeypatch.setattr(QuietHandler, "timeout", 1.0)
    server = make_app_server(study, port=0, seed=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=30) as connection:
            start = time.monotonic()
            connection.sendall(b"POST /api/vote HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
            reply = _read_until_closed(connection)  # the status line and the body may arrive in separate reads
            waited = time.monotonic() - start
        assert reply.startswith("HTTP/1.0 400") and "of the 500 bytes Content-Length announced" in reply
        assert 0.9 < waited < 10  # answered by the timeout, not by the client
        with socket.create_connection(server.server_address, timeout=30) as connection:
            connection.sendall(b"GET /api/results HTTP/1.0\r\n\r\n")
            assert connection.recv(4096).startswith(b"HTTP/1.0 200")  # still serving
    finally:
        server.shutdown()
        server.server_close()


# --- end to end in a browser ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db, folders: dict, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "metrics.human", "serve", "--db", str(db), "--port", str(port), "--seed", "0"]
    for name, folder in folders.items():
        command += ["--model", f"{name}={folder}"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = server.stderr.readline()
    assert f"http://127.0.0.1:{port}/" in line, line
    return server


@pytest.mark.skipif(find_browser() is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_vote_round_trip_in_a_browser_across_a_server_crash(tmp_path, capsys):
    folders = {}
    for model, colour in (("base", (200, 40, 40)), ("tuned", (40, 40, 200))):
        folders[model] = tmp_path / model
        folders[model].mkdir()
        for i in range(3):
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", f"a shape number {i}\nSteps: 20, Sampler: Euler a, Seed: {i}")
            Image.new("RGB", (64, 64), colour).save(folders[model] / f"{i:02d}.png", pnginfo=info)
    db, port = tmp_path / "votes.sqlite", free_port()
    url = f"http://127.0.0.1:{port}/?rater=alice"
    server = start_server(db, folders, port)
    browser = Browser()
    try:
        browser.navigate(url)
        first = browser.wait_for("document.body.dataset.token")
        assert browser.evaluate("document.getElementById('prompt').textContent").startswith("a shape number")
        assert browser.evaluate("document.getElementById('left-image').naturalWidth") == 64
        browser.click("#vote-left")  # a real mouse click
        second = browser.wait_for(f"document.body.dataset.token !== {first!r} && document.body.dataset.token")
        browser.press("ArrowRight", "ArrowRight", 39)  # a real key press
        browser.wait_for("document.getElementById('count').textContent === '2 vote(s) recorded'")
        third = browser.wait_for(f"document.body.dataset.token !== {second!r} && document.body.dataset.token")
        assert len({first, second, third}) == 3

        # The server dies without warning while the third comparison is on screen; the votes were committed.
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = start_server(db, folders, port)
        browser.click("#vote-tie")  # the page loaded before the crash still votes: its comparison was stored
        browser.wait_for("document.getElementById('count').textContent === '3 vote(s) recorded'")
        # Submitting the same comparison again is refused, and the page would say why.
        answer = browser.evaluate(f"fetch('/api/vote', {{method: 'POST', body: JSON.stringify({{token: {first!r}, "
                                  "rater: 'alice', choice: 'right'})}).then(r => r.json())")
        assert "already has a vote" in answer["error"]
        browser.wait_for("document.getElementById('status').textContent === 'All comparisons are done. Thank you!'")
    finally:
        browser.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0

    votes = Store(db).votes()
    assert [v["choice"] for v in votes] == ["left", "right", "tie"]
    winners = [votes[0]["left_model"], votes[1]["right_model"], "tie"]
    capsys.readouterr()
    assert human_main(["report", "--db", str(db), "--html", str(tmp_path / "report.html")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["votes"] == 3 and report["raters"] == 1
    wins = {m: winners.count(m) for m in folders}
    for model in folders:
        assert report["models"][model]["wins"] == wins[model] and report["models"][model]["ties"] == 1
    assert "Bradley–Terry" in (tmp_path / "report.html").read_text()
    assert human_main(["export", "--db", str(db), "--csv", "-"]) == 0
    exported = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(exported.out)))
    assert [r["winner"] for r in rows] == winners and "exported 3 vote(s)" in exported.err


@pytest.mark.parametrize("arguments, message", [
    (["serve", "--model", "a={a}", "--model", "b={b}"], "no image file name appears in two"),
    (["serve", "--model", "a={a}"], "at least two --model"),
    (["serve", "--model", "a={a}", "--model", "a={b}"], "given twice"),
    (["serve", "--model", "a", "--model", "b={b}"], "NAME=DIR"),
    (["report"], "does not exist")])
def test_command_usage_errors_exit_2_with_one_line(arguments, message, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "y.png")
    argv = [a.format(a=tmp_path / "a", b=tmp_path / "b") for a in arguments] + ["--db", str(tmp_path / "v.sqlite")]
    with pytest.raises(SystemExit) as exit_info:
        human_main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1
