"""Human preference study: raters see two models' images for one prompt (models hidden, sides shuffled) and vote.

    python -m metrics.human serve --db votes.sqlite --model base=out/base --model tuned=out/tuned
    python -m metrics.human report --db votes.sqlite          # win rates, Wilson 95 % intervals, Bradley–Terry
    python -m metrics.human export --db votes.sqlite --csv votes.csv

`store` keeps images, handed-out comparisons and votes in SQLite; `server` is the page and its JSON API (standard
library WSGI); `stats` has the Wilson interval and the Bradley–Terry fit.
"""
from .server import HumanEvalApp, make_app_server, results
from .stats import Outcome, bradley_terry, win_rates, wilson_interval
from .store import Store, VoteError

__all__ = ["HumanEvalApp", "make_app_server", "results", "Outcome", "bradley_terry", "win_rates", "wilson_interval",
           "Store", "VoteError"]
