"""The human study of the paper: people compare the R-seed grids of two systems for the same prompt and
seeds and say which is more diverse, which has higher quality and which they prefer overall.

study.py (sample folders -> the prompts every system has, each rater's schedule), answers.py (the
append-only answers.jsonl), server.py (the review page), summary.py (win rates with Wilson intervals,
Bradley-Terry), gallery.py (a static page of the grids side by side); static/ holds the page's files.
`python -m dpdmd_jax.review` is the command.
"""
