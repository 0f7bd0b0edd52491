"""The manual: one topic a file, shipped in the package and read with `atlas help TOPIC` (or on the
repository's web page, as Markdown). The README keeps the first session; everything else is here.

Plain data and a reader: importing it imports nothing heavy (`atlas help` runs before torch is needed).
"""
from __future__ import annotations

from importlib import resources

from ..errors import AtlasError

# name -> one line, in the order a user meets them
TOPICS: dict[str, str] = {
    "building": "Building an atlas: datasets, options, resume, torchrun ranks",
    "models": "Models: the architectures atlas reads, their layers, and what each family gets",
    "channel": "Looking at a channel: atlas show, atlas filters, the display rules",
    "featurevis": "Feature visualization: what a channel wants (atlas visualize)",
    "sql": "Querying with SQL: views, named queries, SQL functions, confinement",
    "similarity": "Similarity search with FAISS (atlas similar, atlas index)",
    "site": "The static site (atlas export)",
    "notebooks": "In a notebook: objects that show themselves",
    "training": "Training with the paper's recipe, feature evolution, filter comparison",
    "analyses": "The paper's analyses: occlusion, invariance, correspondence",
    "compare": "Comparing two atlases: the same units across seeds, checkpoints and models",
    "python": "The Python API: atlas.open, atlas.load_model, atlas.build.build, BuildOptions, the Atlas methods",
    "vocabulary": "One vocabulary: the options every command shares, and their one meaning",
    "format": "The atlas on disk: its files, tables and caches",
    "promises": "Promises: reliability, the threat model (an atlas is data), determinism",
    "performance": "Performance: benchmarks and scale, each with the command that reproduces it",
    "development": "Development: the suite, CI, the code's layers",
}


def read(topic: str) -> str:
    """The topic's text (Markdown), or one line naming the topics there are."""
    if topic not in TOPICS:
        import difflib

        close = difflib.get_close_matches(topic, list(TOPICS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise AtlasError(f"no manual topic '{topic}'{hint}: the topics are {', '.join(TOPICS)}")
    return resources.files(__package__).joinpath(f"{topic}.md").read_text(encoding="utf-8")
