"""The human study's review page in a real browser (Debian's headless chromium through selenium and
chromedriver): a rater names herself on the page, answers comparisons with clicks and keys, reloads
mid-way, the server is killed (SIGKILL) and restarted, and she finishes; answers.jsonl then holds every
answer once, with the system she saw on the side she chose, and `--summary` counts them. The static
gallery renders from disk with every image loaded, also after its folders are moved.

Needs `apt-get install chromium chromium-driver` (the test fails, naming them, when they are missing)
and the pip package selenium. A screenshot of the page goes to the test's tmp folder (review.png)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import REPO
from tests.unit.test_human_summary import make_sample_folder

PROMPTS, SEEDS = 4, 3
QUESTIONS = ("diversity", "quality", "overall")
APT = "apt-get install chromium chromium-driver"


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module, driven through Debian's chromedriver (its path given, so
    Selenium Manager never tries to download a driver)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(f"no chromium / chromedriver on PATH: the browser tests need Debian's `{APT}`")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("review")
    return {n: make_sample_folder(str(root / n), prompts=PROMPTS, seeds=SEEDS, colour=i) for i, n in enumerate("AB")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _review(*flags: str, log: str) -> subprocess.Popen:
    """`python -m dpdmd_jax.review FLAGS`, output to the file `log` (a pipe nobody reads could fill)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dpdmd_jax.review", *flags], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=REPO), stdout=out, stderr=subprocess.STDOUT)


def _start_server(folders: dict[str, str], out: str, port: int, log: str) -> tuple[subprocess.Popen, str]:
    proc = _review(f"--samples={folders['A']},{folders['B']}", "--names=A,B", f"--out={out}", f"--port={port}",
                   log=log)
    deadline = time.time() + 60
    while time.time() < deadline:
        text = open(log).read()
        if "Open http://" in text:
            return proc, text.split("Open ", 1)[1].split()[0]
        if proc.poll() is not None:
            pytest.fail(f"the review server exited with code {proc.returncode}:\n{text}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the review server printed no address in 60 s:\n{open(log).read()}")


def _wait(b, condition, what: str, timeout: float = 15):
    return WebDriverWait(b, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def _shown(b) -> int:
    """Waits until a comparison is shown with all its images loaded and no answer in flight; its number."""
    _wait(b, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#review:not([hidden]) .grid img')];"
        "return imgs.length === 2 * arguments[0] && imgs.every(i => i.complete && i.naturalWidth > 0)"
        " && document.body.dataset.pending === '0';", SEEDS), "a comparison with its images")
    return int(b.execute_script("return document.body.dataset.n"))


def _sides(b) -> dict[str, str]:
    """side -> the system whose images the page shows there, read from the pixels (A's are red, B's
    green: `make_sample_folder`'s colours 0 and 1)."""
    rgb = b.execute_script("""
        const out = {};
        for (const side of ['left', 'right']) {
          const img = document.querySelector('#' + side + ' img');
          const c = document.createElement('canvas');
          c.width = img.naturalWidth; c.height = img.naturalHeight;
          const g = c.getContext('2d'); g.drawImage(img, 0, 0);
          out[side] = Array.from(g.getImageData(c.width - 1, c.height - 1, 1, 1).data);
        }
        return out;""")
    return {side: "A" if px[0] > px[1] else "B" for side, px in rgb.items()}


def _chosen(b) -> dict[str, str]:
    return {e.get_attribute("data-q"): e.get_attribute("data-choice")
            for e in b.find_elements(By.CSS_SELECTOR, ".question button.chosen")}


def _settled(b) -> None:
    _wait(b, lambda d: d.execute_script("return document.body.dataset.pending") == "0", "answers saved")


def _click(b, question: str, choice: str) -> None:
    b.find_element(By.CSS_SELECTOR, f'button[data-q="{question}"][data-choice="{choice}"]').click()


def _keys(b, *keys: str) -> None:
    b.find_element(By.TAG_NAME, "body").send_keys(*keys)


def _next(b, n: int) -> None:
    """Enter (all three answered and saved) -> the next comparison."""
    _settled(b)
    _keys(b, Keys.ENTER)
    _wait(b, lambda d: d.execute_script("return document.body.dataset.n") != str(n), "the next comparison")


def test_review_page_clicks_keys_reload_and_server_restart(browser, folders, tmp_path):
    b, out, port = browser, str(tmp_path / "study"), _free_port()
    server, url = _start_server(folders, out, port, str(tmp_path / "server1.log"))
    given: dict[int, dict[str, str]] = {}  # n -> question -> choice
    sides: dict[int, dict[str, str]] = {}  # n -> side -> system seen there
    prompts: dict[int, str] = {}
    try:
        b.get(url)  # no ?rater=: the page asks for a name
        name = _wait(b, lambda d: d.find_element(By.ID, "rater-name"), "the name field")
        _wait(b, lambda d: name.is_displayed(), "the name form")
        name.send_keys("ann", Keys.ENTER)
        n = _shown(b)
        assert n == 0 and "rater=ann" in b.current_url  # a reload keeps the rater
        assert all(i.get_attribute("src").split("/", 3)[3].startswith("image?") for i in b.find_elements(
            By.CSS_SELECTOR, ".grid img")) and folders["A"] not in b.page_source  # anonymised
        sides[0], prompts[0] = _sides(b), b.find_element(By.ID, "prompt").text

        # Comparison 0 with clicks.
        given[0] = dict(diversity="left", quality="right", overall="tie")
        for q, choice in given[0].items():
            _click(b, q, choice)
        _settled(b)
        assert _chosen(b) == given[0]
        b.save_screenshot(str(tmp_path / "review.png"))
        b.find_element(By.ID, "next").click()
        _wait(b, lambda d: d.execute_script("return document.body.dataset.n") == "1", "comparison 1")

        # Comparison 1 with keys, reloaded after two of its three answers.
        assert _shown(b) == 1
        sides[1], prompts[1] = _sides(b), b.find_element(By.ID, "prompt").text
        _keys(b, "a", Keys.ARROW_RIGHT)
        _settled(b)
        b.refresh()
        assert _shown(b) == 1 and _sides(b) == sides[1]  # the same comparison, the same placement
        assert _chosen(b) == dict(diversity="left", quality="right")
        assert "current" in b.find_element(By.CSS_SELECTOR, '.question[data-q="overall"]').get_attribute("class")
        _keys(b, "s")
        given[1] = dict(diversity="left", quality="right", overall="tie")
        _next(b, 1)

        # Comparison 2: one answer, then the server is killed; an answer given meanwhile is not kept.
        assert _shown(b) == 2
        sides[2], prompts[2] = _sides(b), b.find_element(By.ID, "prompt").text
        _keys(b, "d")
        _settled(b)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        _keys(b, Keys.ARROW_DOWN)
        _wait(b, lambda d: "not saved" in d.find_element(By.ID, "status").text, "the page saying it did not save")
        assert _chosen(b) == dict(diversity="right")
        server, url2 = _start_server(folders, out, port, str(tmp_path / "server2.log"))
        assert url2 == url
        b.refresh()
        assert _shown(b) == 2 and _sides(b) == sides[2] and _chosen(b) == dict(diversity="right")
        _keys(b, Keys.ARROW_DOWN, Keys.ARROW_LEFT)
        given[2] = dict(diversity="right", quality="tie", overall="left")
        _next(b, 2)

        # Comparison 3, clicks and keys mixed; then the page says all are done.
        assert _shown(b) == 3
        sides[3], prompts[3] = _sides(b), b.find_element(By.ID, "prompt").text
        _click(b, "diversity", "tie")
        _keys(b, "a", "d")
        given[3] = dict(diversity="tie", quality="left", overall="right")
        _settled(b)
        _keys(b, Keys.ENTER)
        _wait(b, lambda d: d.find_element(By.ID, "done").is_displayed(), "the done screen")
        assert b.find_element(By.ID, "progress").text == f"{PROMPTS} / {PROMPTS} done"
    finally:
        server.kill()
        server.wait(10)

    rows = [json.loads(line) for line in open(os.path.join(out, "answers.jsonl"))]
    keys = [(r["rater"], r["prompt_index"], tuple(r["pair"]), r["question"]) for r in rows]
    assert len(rows) == 4 * 3 and len(set(keys)) == len(keys)  # every answer once, none lost
    assert {r["prompt_index"] for r in rows} == set(range(PROMPTS))  # every prompt once for the pair
    for r in rows:
        n = r["n"]
        assert (r["rater"], r["pair"], r["prompt"]) == ("ann", ["A", "B"], prompts[n])
        assert (r["left"], r["right"]) == (sides[n]["left"], sides[n]["right"])  # what the page showed
        assert r["choice"] == given[n][r["question"]]
        assert r["winner"] == ("tie" if r["choice"] == "tie" else sides[n][r["choice"]])

    summary = subprocess.run([sys.executable, "-m", "dpdmd_jax.review", f"--out={out}", "--summary"], cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    result = json.loads(open(os.path.join(out, "summary.json")).read())
    for q in QUESTIONS:
        won = Counter("tie" if given[n][q] == "tie" else sides[n][given[n][q]] for n in given)
        (pair,) = result["questions"][q]["pairs"]
        assert (pair["a"], pair["b"], pair["a_wins"], pair["b_wins"], pair["ties"]) == (
            "A", "B", won["A"], won["B"], won["tie"])
        assert pair["a_win_rate"] == pytest.approx((won["A"] + won["tie"] / 2) / 4)
    assert "| A vs B" in open(os.path.join(out, "summary.md")).read()


def test_gallery_renders_every_image_from_disk(browser, folders, tmp_path):
    root = os.path.dirname(folders["A"])
    out = os.path.join(root, "gallery")  # beside the sample folders: the gallery links ../A/images/...
    proc = _review(f"--samples={folders['A']},{folders['B']}", "--names=A,B", f"--out={out}", "--gallery",
                   log=str(tmp_path / "gallery.log"))
    assert proc.wait(120) == 0, open(tmp_path / "gallery.log").read()
    # Moved with its folders, the gallery still finds its images (relative paths).
    moved = tmp_path / "moved"
    for name in ("A", "B", "gallery"):
        shutil.copytree(os.path.join(root, name), moved / name)
    b = browser
    b.get((moved / "gallery" / "gallery.html").as_uri())
    srcs = b.execute_script("return [...document.images].map(i => i.getAttribute('src'))")
    assert len(srcs) == 2 * PROMPTS * SEEDS and all(s.startswith("../A/images/") or s.startswith("../B/images/")
                                                    for s in srcs)
    b.execute_script("for (const i of document.images) i.scrollIntoView();")  # lazy images load once seen
    _wait(b, lambda d: d.execute_script(
        "return [...document.images].every(i => { i.scrollIntoView(); return i.complete && i.naturalWidth > 0; })"),
        "every gallery image loaded")
    assert [e.text for e in b.find_elements(By.TAG_NAME, "figcaption")] == ["A", "B"] * PROMPTS
