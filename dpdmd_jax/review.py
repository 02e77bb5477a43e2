r"""The human study of the paper: a local review page where raters compare the seed grids of two
systems per prompt, a summary of their answers, and a static gallery.

    # serve the review page (prints the address to open; each rater adds ?rater=NAME or types a name):
    python -m dpdmd_jax.review --samples=runs/dmd_samples,runs/dpdmd_samples --names=DMD,DP-DMD --out=runs/study
    # win rates with Wilson intervals and a Bradley-Terry ranking -> runs/study/summary.md / summary.json:
    python -m dpdmd_jax.review --out=runs/study --summary
    # a static page of every system's grids side by side per prompt -> runs/study/gallery.html:
    python -m dpdmd_jax.review --samples=... --names=... --out=runs/study --gallery

For one prompt at a time the page shows two systems' R-seed grids, anonymised and placed left / right
at random (fixed per rater, prompt and pair by --seed: a reload shows the same), and asks the paper's
three questions: which set is more diverse, which has higher quality, which is preferred overall
(left / tie / right; keys A S D or the arrows, 1 2 3 pick a question, Enter moves on). Every pair of
systems is compared on every prompt that all of them have with all their seeds (the prompts left out
are named). Each answer is appended to `--out`/answers.jsonl as it is given (flushed and synced: a
reload, a closed tab or a killed server loses nothing) and a restarted server continues where each
rater stopped. Images are read from the sample folders, never copied. The server listens on
127.0.0.1 by default; `--host=0.0.0.0` shares it on a lab network (no authentication: a trusted
network only). Bad input exits with code 2 and one line (`dpdmd_jax.cli`).
"""

from __future__ import annotations

from absl import flags

from dpdmd_jax import cli
from dpdmd_jax.human.gallery import write_gallery
from dpdmd_jax.human.server import open_review, serve
from dpdmd_jax.human.study import ReviewError, open_study
from dpdmd_jax.human.summary import markdown, write_summary

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    flags.DEFINE_list("samples", None, "Sample folders of the systems to compare (comma separated, 2 or more).")
    flags.DEFINE_list("names", None, "A name per folder (default: the folder names); --summary: the systems to rank.")
    flags.DEFINE_string("out", None, "The study's folder: answers.jsonl, study.json, summary.*, gallery.html.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface, for a lab network).")
    flags.DEFINE_integer("port", 0, "Port to listen on (0: a free one, printed).")
    flags.DEFINE_string("rater", None, "The rater's name when the page is opened without ?rater=NAME.")
    flags.DEFINE_integer("seed", 0, "Seed of each rater's order of comparisons and left / right placements.")
    flags.DEFINE_bool("summary", False, "Write summary.md / summary.json from --out's answers, and exit.")
    flags.DEFINE_bool("gallery", False, "Write the static gallery.html into --out, and exit (no server).")
    flags.mark_flags_as_required(["out"])


def main(argv):
    del argv
    if FLAGS.summary:
        summary = write_summary(FLAGS.out, FLAGS.names)
        print(markdown(summary) + f"\nWrote {FLAGS.out}/summary.md and summary.json")
        return
    study = open_study(FLAGS.samples or [], FLAGS.names)
    if study.left_out:
        print(study.left_out)
    if FLAGS.gallery:
        print(f"Wrote {write_gallery(study, FLAGS.out)}: open it in a browser")
        return
    serve(open_review(study, FLAGS.out, FLAGS.seed, FLAGS.rater), FLAGS.host, FLAGS.port)


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=(ReviewError,))
