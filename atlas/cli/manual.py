"""`atlas help [TOPIC]`: the manual that ships in the package (atlas/manual/)."""
from __future__ import annotations

import click

from .base import CONTEXT, main


@main.command("help", context_settings=CONTEXT)
@click.argument("topic", required=False)
def help_(topic):
    """Read the manual: `atlas help` lists its topics, `atlas help TOPIC` prints one (Markdown).

    \b
      atlas help building        # datasets, options, resume
      atlas help promises        # reliability, the threat model, determinism
    """
    from ..manual import TOPICS, read

    if topic is None:
        width = max(map(len, TOPICS))
        click.echo("Topics (atlas help TOPIC):\n" + "\n".join(f"  {n:<{width}}  {d}" for n, d in TOPICS.items()))
        click.echo("\nEvery command explains its options with --help; the manual is also in atlas/manual/*.md.")
        return
    click.echo(read(topic).rstrip())
