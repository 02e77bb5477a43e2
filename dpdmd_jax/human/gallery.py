"""A static gallery: one HTML file with, per prompt, every system's seed grid side by side, named (for
those who just want to look; no server). Images are linked by paths relative to the gallery's folder,
so the page works when that folder is opened from disk (or the folders are moved together); nothing is
copied."""

from __future__ import annotations

import html
import math
import os
import pathlib
import urllib.parse

from dpdmd_jax.human.study import Study

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _href(path: str, start: str) -> str:
    """`path` relative to folder `start`, as a URL path (forward slashes, special characters quoted)."""
    return urllib.parse.quote(pathlib.Path(os.path.relpath(path, start)).as_posix())


def gallery_html(study: Study, out: str) -> str:
    """The gallery page for a file in folder `out`."""
    with open(os.path.join(STATIC, "gallery.css")) as f:
        css = f.read()
    r = len(study.seeds)
    cols = r if r <= 3 else math.ceil(math.sqrt(r))  # as the review page: a row up to 3, then near-square
    esc = html.escape
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Samples: {esc(' / '.join(study.names))}</title>", f"<style>{css}</style></head><body>",
             f"<h1>{esc(' / '.join(study.names))}</h1>",
             f"<p class=\"info\">{len(study.prompts)} prompts, seeds {esc(', '.join(map(str, study.seeds)))}"
             + (f"; {esc(study.left_out)}" if study.left_out else "") + "</p>"]
    for p in study.prompts:
        parts.append(f'<section class="prompt" id="p{p.index:05d}"><h2><span class="index">p{p.index:05d}</span> '
                     f"{esc(p.text)}</h2><div class=\"systems\">")
        for i, system in enumerate(study.systems):
            images = "".join(
                f'<img loading="lazy" src="{esc(_href(study.image(i, p, s), out))}" alt="{esc(system.name)} seed {s}" '
                f'title="seed {s}">' for s in study.seeds)
            parts.append(f'<figure class="system"><figcaption>{esc(system.name)}</figcaption>'
                         f'<div class="grid" style="--cols: {cols}">{images}</div></figure>')
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_gallery(study: Study, out: str) -> str:
    """Writes `out`/gallery.html (replaced atomically); returns its path."""
    out = os.path.abspath(os.path.expanduser(out))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gallery.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(gallery_html(study, out))
    os.replace(tmp, path)
    return path
