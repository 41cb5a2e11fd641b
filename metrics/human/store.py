"""The study's SQLite database: the images under comparison, the comparisons handed out, and the votes.

Tables:
    images  (model, item) -> path, prompt. An *item* is one prompt/seed; every model has one image of it (the same
            file name in each model's folder, as `metrics.compare` writes them).
    tasks   one comparison shown to a rater: a random token, the item, which model is on the left and which on the
            right. The page only ever sees the token, so model names never reach the browser.
    votes   at most one per task (UNIQUE token): rater, choice ("left" | "right" | "tie"), time (UTC, ISO 8601).

Every write is its own committed transaction in a write-ahead-logged database with synchronous=FULL, so a vote that
was acknowledged survives a crash of the server or of the machine. Connections are opened per call: the server is
multi-threaded and SQLite connections must not be shared between threads.
"""
import csv
import os
import random
import secrets
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations

from .stats import Outcome

CHOICES = ("left", "right", "tie")



def item_prompt(item: str) -> str:
    """SQL for the prompt of an item (`item` is a parameter or column): the models' images of one item share it, but
    a folder may lack captions, so any non-empty one is taken (MAX, to be deterministic whatever the sides)."""
    return f"(SELECT COALESCE(MAX(prompt), '') FROM images WHERE item = {item} AND prompt != '')"

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    model TEXT NOT NULL, item TEXT NOT NULL, path TEXT NOT NULL, prompt TEXT NOT NULL,
    PRIMARY KEY (model, item));
CREATE TABLE IF NOT EXISTS tasks (
    token TEXT PRIMARY KEY, rater TEXT NOT NULL, item TEXT NOT NULL,
    left_model TEXT NOT NULL, right_model TEXT NOT NULL, issued_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE REFERENCES tasks (token), rater TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')), voted_at TEXT NOT NULL);
"""


class VoteError(ValueError):
    """A submission that was not recorded; `status` is the HTTP status that says why (400, 404 or 409)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Task:
    token: str
    item: str
    prompt: str
    left_path: str
    right_path: str


def outcome(vote: dict) -> Outcome:
    """The model-level result of a vote row of `Store.votes`."""
    winner = {"left": vote["left_model"], "right": vote["right_model"], "tie": None}[vote["choice"]]
    return Outcome(vote["left_model"], vote["right_model"], winner)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def connect(self):
        """A connection in autocommit mode (each statement commits unless a BEGIN opened a transaction)."""
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db

    def add_images(self, model: str, images: list[tuple[str, str, str]]) -> None:
        """Register (item, path, prompt) images of `model`; an item registered before gets the new path and prompt."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO images (model, item, path, prompt) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (model, item) DO UPDATE SET path = excluded.path, prompt = excluded.prompt",
                           [(model, item, path, prompt) for item, path, prompt in images])
            db.execute("COMMIT")

    def models(self) -> list[str]:
        with self.connect() as db:
            return [row[0] for row in db.execute("SELECT DISTINCT model FROM images ORDER BY model")]

    def next_task(self, rater: str, rng: random.Random) -> Task | None:
        """A comparison for `rater`: among the (item, model pair)s this rater has not voted on, one of those with the
        fewest votes so far (so votes spread evenly), with a random side for each model. None when none is left."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")  # choose and record the task atomically with respect to other requests
            models_by_item: dict[str, list[str]] = {}
            for model, item in db.execute("SELECT model, item FROM images ORDER BY item, model"):
                models_by_item.setdefault(item, []).append(model)
            vote_counts, voted_by_rater = {}, set()
            for item, left, right, rater_of_vote in db.execute(
                    "SELECT t.item, t.left_model, t.right_model, v.rater FROM votes v JOIN tasks t USING (token)"):
                key = (item, *sorted((left, right)))
                vote_counts[key] = vote_counts.get(key, 0) + 1
                if rater_of_vote == rater:
                    voted_by_rater.add(key)
            candidates = [(item, a, b) for item, models in models_by_item.items()
                          for a, b in combinations(models, 2) if (item, a, b) not in voted_by_rater]
            if not candidates:
                db.execute("COMMIT")
                return None
            fewest = min(vote_counts.get(c, 0) for c in candidates)
            item, first, second = rng.choice([c for c in candidates if vote_counts.get(c, 0) == fewest])
            left, right = (first, second) if rng.random() < 0.5 else (second, first)
            token = secrets.token_urlsafe(16)
            db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?)", (token, rater, item, left, right, _now()))
            paths = dict(db.execute("SELECT model, path FROM images WHERE item = ? AND model IN (?, ?)",
                                    (item, left, right)))
            (prompt,) = db.execute(f"SELECT {item_prompt('?')}", (item,)).fetchone()
            db.execute("COMMIT")
        return Task(token, item, prompt, paths[left], paths[right])

    def task_image(self, token: str, side: str) -> str | None:
        """Path of the image shown on `side` ("left" | "right") of a task, or None for an unknown token or side."""
        if side not in ("left", "right"):
            return None
        with self.connect() as db:
            row = db.execute(f"SELECT i.path FROM tasks t JOIN images i ON i.item = t.item AND i.model = "
                             f"t.{side}_model WHERE t.token = ?", (token,)).fetchone()
        return row[0] if row else None

    def record_vote(self, token: str, rater: str, choice: str) -> int:
        """Store one vote and commit it; returns how many votes `rater` has now. Raises VoteError (nothing stored) for
        an unknown token (404), a token handed to another rater or an invalid choice (400), a second vote (409)."""
        if choice not in CHOICES:
            raise VoteError(f"choice must be one of {', '.join(CHOICES)}; got {choice!r}")
        with self.connect() as db:
            row = db.execute("SELECT rater FROM tasks WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise VoteError("unknown comparison token: this comparison was never handed out here", 404)
            if row[0] != rater:
                raise VoteError(f"this comparison was handed to rater {row[0]!r}, not {rater!r}")
            try:
                db.execute("INSERT INTO votes (token, rater, choice, voted_at) VALUES (?, ?, ?, ?)",
                           (token, rater, choice, _now()))
            except sqlite3.IntegrityError:
                raise VoteError("this comparison already has a vote; the first one stands", 409) from None
            return db.execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater,)).fetchone()[0]

    def votes(self) -> list[dict]:
        """Every vote with its comparison, oldest first."""
        with self.connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                f"SELECT v.id AS vote_id, v.voted_at, v.rater, t.item, {item_prompt('t.item')} AS prompt, "
                "t.left_model, t.right_model, v.choice FROM votes v JOIN tasks t USING (token) ORDER BY v.id"
            ).fetchall()
        return [dict(row) for row in rows]

    def outcomes(self) -> list[Outcome]:
        return [outcome(v) for v in self.votes()]

    def export_csv(self, file) -> int:
        """Write all votes as CSV (header, one row per vote, `winner` = model name or "tie"); returns the count."""
        votes = self.votes()
        writer = csv.writer(file)
        writer.writerow(["vote_id", "voted_at", "rater", "item", "prompt", "left_model", "right_model", "choice",
                         "winner"])
        for v in votes:
            winner = {"left": v["left_model"], "right": v["right_model"], "tie": "tie"}[v["choice"]]
            writer.writerow([v["vote_id"], v["voted_at"], v["rater"], v["item"], v["prompt"], v["left_model"],
                             v["right_model"], v["choice"], winner])
        return len(votes)
