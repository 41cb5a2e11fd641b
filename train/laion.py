"""LAION-style parquet metadata: filtering and joining with downloaded shards. Needs pyarrow (the `laion` extra).

Columns (LAION-2B/5B release): URL, TEXT, WIDTH, HEIGHT, LANGUAGE, SIMILARITY (CLIP image-text cosine), PWATERMARK
(watermark probability), PUNSAFE (NSFW probability). Nothing is downloaded here; after filtering, a user fetches the
images with img2dataset (see docs/TRAINING.md), which writes webdataset shards whose `<key>.json` keeps the URL, and
`join_by_url` keeps the shard samples that the filtered table lists.

Filters run in a fixed order, each on what the previous ones kept, so the summary says how many rows *each* removed.
A row with a null in a filtered column fails that filter (nothing is known about it).
"""
from dataclasses import dataclass


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ImportError:
        raise ImportError("LAION metadata needs pyarrow: pip install pyarrow (the 'laion' extra)") from None
    return pyarrow


@dataclass
class LaionFilter:
    min_size: int = 0                 # both WIDTH and HEIGHT at least this
    min_similarity: float | None = None
    max_pwatermark: float | None = None
    max_punsafe: float | None = None
    language: str | None = None       # LANGUAGE equal to this (case-insensitive)

    def steps(self):
        """(name, column, predicate on a pyarrow table) for each active filter, in order."""
        pc = _pyarrow().compute
        steps = []
        if self.min_size:
            steps.append((f"min size {self.min_size}", ("WIDTH", "HEIGHT"),
                          lambda t: pc.and_(pc.greater_equal(t["WIDTH"], self.min_size),
                                            pc.greater_equal(t["HEIGHT"], self.min_size))))
        if self.min_similarity is not None:
            steps.append((f"similarity < {self.min_similarity}", ("SIMILARITY",),
                          lambda t: pc.greater_equal(t["SIMILARITY"], self.min_similarity)))
        if self.max_pwatermark is not None:
            steps.append((f"pwatermark > {self.max_pwatermark}", ("PWATERMARK",),
                          lambda t: pc.less_equal(t["PWATERMARK"], self.max_pwatermark)))
        if self.max_punsafe is not None:
            steps.append((f"punsafe > {self.max_punsafe}", ("PUNSAFE",),
                          lambda t: pc.less_equal(t["PUNSAFE"], self.max_punsafe)))
        if self.language is not None:
            steps.append((f"language != {self.language}", ("LANGUAGE",),
                          lambda t: pc.equal(pc.utf8_lower(t["LANGUAGE"]), self.language.lower())))
        return steps


def filter_table(table, spec: LaionFilter):
    """(filtered table, [(filter name, rows removed)])."""
    pc = _pyarrow().compute
    removed = []
    for name, columns, predicate in spec.steps():
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"filter '{name}' needs column(s) {missing}; the table has {table.column_names}")
        keep = pc.fill_null(predicate(table), False)
        before = table.num_rows
        table = table.filter(keep)
        removed.append((name, before - table.num_rows))
    return table, removed


def filter_parquet(source: str, destination: str, spec: LaionFilter) -> tuple[int, int, list[tuple[str, int]]]:
    """Filter one parquet file into another; returns (rows in, rows out, removed per filter)."""
    pa = _pyarrow()
    table = pa.parquet.read_table(source)
    filtered, removed = filter_table(table, spec)
    pa.parquet.write_table(filtered, destination)
    return table.num_rows, filtered.num_rows, removed


def read_urls(path: str) -> set[str]:
    """The URL column of a (filtered) parquet file."""
    table = _pyarrow().parquet.read_table(path, columns=["URL"])
    return {u for u in table.column("URL").to_pylist() if u}


def join_by_url(items: list, parquet_path: str, report) -> list:
    """Keep the shard items whose URL (from img2dataset's .json) the parquet lists; the others are counted as
    "not in metadata"."""
    urls = read_urls(parquet_path)
    kept = []
    for item in items:
        if item.url in urls:
            kept.append(item)
        else:
            report.add("not in metadata", item.key, item.url or "no url in .json")
    return kept
