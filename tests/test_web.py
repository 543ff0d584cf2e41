"""The web page: served by the app (plain HTTP checks), and driven in headless Chromium against a real uvicorn.

The browser test starts the real app on a loopback port with a tiny random checkpoint as "custom", GPT-2
pointed at a directory that does not exist (so its panel must say why it is not loaded) and an API key
(so the page must send it). It drives Debian's /usr/bin/chromium through Playwright's own driver (never
`playwright install`) and leaves screenshots in test-artifacts/. Skipped, with the reason, where Chromium,
Playwright or the GPT-2 BPE ranks are missing.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tinyllm import assets
from tinyllm.config import ModelConfig
from tinyllm.server import ServerSettings, create_app
from tinyllm.server.routes_ops import STATIC_DIR

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
API_KEY = "test-key-123"
PROMPT = "The future of AI is"
PROMPT_IDS = [464, 2003, 286, 9552, 318]


# --- plain HTTP: the page and its assets are served, and nothing on it loads from elsewhere -------------------


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The app without models (none are needed to serve the page), with an API key the page must not need."""
    app = create_app(ServerSettings(checkpoint=None, gpt2=None, api_key=API_KEY))
    with TestClient(app, base_url="http://localhost") as c:
        yield c


def test_page_and_static_files_are_served_without_the_key(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in page.text
    assert 'id="prompt"' in page.text

    for path, kind in [("/static/app.js", "javascript"), ("/static/style.css", "text/css")]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert kind in response.headers["content-type"], (path, response.headers["content-type"])

    missing = client.get("/static/no-such-file.js")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/json")
    assert "detail" in missing.json()


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_page_loads_nothing_from_other_origins() -> None:
    parser = _Refs()
    parser.feed((STATIC_DIR / "index.html").read_text())
    assert parser.refs, "no references parsed"
    external = [r for r in parser.refs if re.match(r"^(https?:)?//", r)]
    assert external == []
    for name in ("app.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"https?://|@import|url\(\s*['\"]?//", text), name


# --- a real server on loopback -----------------------------------------------------------------------------------


@dataclass
class LiveServer:
    url: str
    gpt2_dir: Path


def _tiny_checkpoint(path: Path) -> Path:
    """A random 2-layer GPT with the GPT-2 vocabulary, its weights scaled up from GPT-2's init so that its
    next-token distributions are peaked (top token ~20%) but not stuck on one token: popovers worth seeing."""
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=512, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.4)  # the tied head: logits of std ~2, not ~0.1
        model.transformer.wpe.weight.normal_(0.0, 0.3)
        for weight in model.transformer.h.parameters():
            if weight.dim() == 2:  # (out, in) Linear weights
                weight.normal_(0.0, 0.3 / weight.shape[0] ** 0.5)
    return save_checkpoint(path, model=model, meta={"tokenizer": "gpt2", "step": 0})


def _paced_engine(loaded, settings):  # noqa: ANN001, ANN202 (an EngineFactory)
    """The production engine with each step taking at least 3 ms: a 480-token generation then lasts over a second,
    so the page's Stop lands mid-stream however fast this machine decodes the tiny model (it raced: ~1 run in 3
    on a quiet 2-core machine finished all 480 tokens before the click)."""
    from tinyllm.server.worker import default_engine

    engine = default_engine(loaded, settings)
    step = engine.step

    def paced_step():  # noqa: ANN202
        time.sleep(0.003)
        return step()

    engine.step = paced_step  # type: ignore[method-assign]
    return engine


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import uvicorn

    if not assets.gpt2_ranks_path().exists():
        pytest.skip("GPT-2 BPE ranks not fetched; run `tinyllm fetch-assets` (make test does)")
    root = tmp_path_factory.mktemp("web")
    gpt2_dir = root / "gpt2-weights-not-here"
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        checkpoint=str(_tiny_checkpoint(root / "custom")),
        gpt2=str(gpt2_dir),
        api_key=API_KEY,
        slots=2,
        load_wait_s=60.0,
    )
    app = create_app(settings, engine_factory=_paced_engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", gpt2_dir=gpt2_dir)
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`make browser`) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_page_compares_models_in_a_real_browser(live_server: LiveServer, browser) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the page is served with a strict Content-Security-Policy: nothing on it may be refused by it
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
    page.set_default_timeout(20_000)
    expect.set_options(timeout=60_000)  # generous: CI machines with 2 busy cores decode slowly
    try:
        page.goto(live_server.url + "/")

        # Without the key, /tokenize and /ready answer 401: the page opens the key box instead of failing silently.
        expect(page.locator("#token-count")).to_contain_text("missing API key")
        expect(page.locator("#api-key-box")).to_have_attribute("open", "")
        page.fill("#api-key", API_KEY)
        assert page.evaluate("localStorage.getItem('tinyllm.apiKey')") is None  # kept only when asked to
        page.check("#remember-key")
        assert page.evaluate("localStorage.getItem('tinyllm.apiKey')") == API_KEY
        page.uncheck("#remember-key")
        assert page.evaluate("localStorage.getItem('tinyllm.apiKey')") is None

        # The prompt's GPT-2 tokens, with ids, live as it is typed.
        page.fill("#prompt", "")
        page.locator("#prompt").press_sequentially(PROMPT, delay=10)
        chip_ids = page.locator("#token-chips .chip-id")
        expect(chip_ids).to_have_text([str(i) for i in PROMPT_IDS])
        expect(page.locator("#token-chips .chip-text").first).to_have_text("The")
        expect(page.locator("#token-count")).to_contain_text("5 tokens")

        # GPT-2 is not loaded here: its panel says why, from /ready, before anything is generated.
        gpt2 = page.locator("#panel-gpt2")
        expect(gpt2.locator('[data-role="notice"]')).to_contain_text("Not loaded:")
        expect(gpt2.locator('[data-role="notice"]')).to_contain_text("gpt2-weights-not-here")

        # Generate with Ctrl+Enter: the custom panel streams text, counts tokens and reports the rate.
        page.fill("#max_tokens", "24")
        page.fill("#seed", "1234")
        page.check("#show-probs")
        page.locator("#prompt").press("Control+Enter")
        custom = page.locator("#panel-custom")
        expect(custom.locator('[data-stat="finish"]')).to_have_text("length")
        expect(custom.locator('[data-stat="tokens"]')).to_have_text("24")
        rate = custom.locator('[data-stat="rate"]').inner_text()
        assert float(rate) > 0, rate
        expect(custom.locator('[data-stat="ttft"]')).to_contain_text("ms")
        assert custom.locator(".output .tok").count() >= 12
        generated = custom.locator(".output").inner_text()
        assert generated.startswith(PROMPT) and len(generated) > len(PROMPT) + 6, generated
        expect(page.locator("#generate")).to_be_enabled()
        expect(page.locator("#stop")).to_be_disabled()
        # ...and GPT-2's panel shows the 503's message rather than an empty box.
        expect(gpt2.locator('[data-role="notice"]')).to_contain_text("not available")
        expect(gpt2.locator('[data-stat="finish"]')).to_have_text("not loaded")

        # Hovering a generated token shows its probability and the top-5 alternatives.
        token = custom.locator(".output .tok").nth(3)
        token.hover()
        popover = page.locator("#popover")
        expect(popover).to_be_visible()
        expect(popover.locator(".pop-prob")).to_contain_text("%")
        assert popover.locator(".pop-list li").count() >= 2
        assert popover.locator(".pop-list li.chosen").count() == 1  # logprobs are before sampling filters
        page.screenshot(path=str(ARTIFACTS / "web-compare.png"), full_page=True)

        # Keyboard: the tokens are one tab stop; arrows move between them and the popover follows focus.
        page.mouse.move(0, 0)
        expect(popover).to_be_hidden()
        first = custom.locator(".output .tok").first
        expect(first).to_have_attribute("tabindex", "0")
        first.focus()
        expect(popover).to_be_visible()
        page.keyboard.press("ArrowRight")
        expect(custom.locator(".output .tok").nth(1)).to_be_focused()
        expect(popover).to_be_visible()
        page.keyboard.press("Escape")
        expect(popover).to_be_hidden()

        # Same seed, same text: sampling is reproducible through the page.
        page.click("#generate")
        expect(custom.locator('[data-stat="finish"]')).to_have_text("length")
        assert custom.locator(".output").inner_text() == generated

        # Stop aborts the stream mid-way.
        page.fill("#max_tokens", "480")
        page.fill("#seed", "")
        page.click("#generate")
        expect(custom.locator(".output .tok").nth(5)).to_be_attached()
        page.click("#stop")
        expect(custom.locator('[data-stat="finish"]')).to_have_text("stopped")
        assert int(custom.locator('[data-stat="tokens"]').inner_text()) < 480
        expect(page.locator("#form-status")).to_contain_text("Stopped")
        expect(page.locator("#generate")).to_be_enabled()

        # Phone width (dark theme for the screenshot): the panels stack.
        page.set_viewport_size({"width": 390, "height": 844})
        page.emulate_media(color_scheme="dark")
        a, b = custom.bounding_box(), gpt2.bounding_box()
        assert b["y"] >= a["y"] + a["height"], (a, b)
        page.screenshot(path=str(ARTIFACTS / "web-phone.png"), full_page=True)

        assert errors == []
        assert all(url.startswith(live_server.url) or url.startswith("data:") for url in requested), requested
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "web-failure.png"), full_page=True)
        raise
    finally:
        context.close()


def test_page_key_box_numbers_truncation_and_focus(live_server: LiveServer, browser) -> None:
    """Found by an exploratory pass: the key box reopened over the prompt on every keystroke; a 401's notice
    outlived the right key; "1e2" tokens were sent as 1; the context error asked for a truncation the page could
    not ask for; Generate from the keyboard left focus on <body>."""
    import json

    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 375, "height": 740})
    page = context.new_page()
    bodies: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/completions") and bodies.append(json.loads(r.post_data)))
    page.set_default_timeout(20_000)
    expect.set_options(timeout=60_000)
    try:
        page.goto(live_server.url + "/")
        box = page.locator("#api-key-box")
        expect(box).to_have_attribute("open", "")  # a key is needed: the box opens once...
        page.locator("#panel-custom").click()  # ...and a click elsewhere closes it
        expect(box).not_to_have_attribute("open", "")
        page.locator("#prompt").press_sequentially(" and", delay=20)
        page.wait_for_timeout(900)  # past the tokenize debounce: its 401 must not reopen the box
        expect(box).not_to_have_attribute("open", "")

        custom = page.locator("#panel-custom")
        page.click("#generate")
        expect(custom.locator('[data-role="notice"]')).to_contain_text("Unauthorized")
        page.click("#api-key-box summary")
        page.fill("#api-key", API_KEY)
        expect(custom.locator('[data-role="notice"]')).to_be_hidden()  # the new key's; the old 401 no longer holds
        expect(page.locator("#tokenizer-name")).to_have_text("GPT-2 BPE")  # the tiny custom model keeps GPT-2's

        page.fill("#max_tokens", "2.7")
        page.click("#generate")
        expect(page.locator("#form-status")).to_contain_text("Max tokens must be a whole number")
        expect(page.locator("#max_tokens")).to_be_focused()
        assert len(bodies) == 2  # the unauthorized run's two; nothing more sent

        page.fill("#max_tokens", "1e1")
        page.fill("#seed", "5")
        page.check("#truncate")
        page.focus("#generate")
        page.keyboard.press("Enter")
        expect(custom.locator('[data-stat="finish"]')).to_have_text("length")
        sent = [b for b in bodies if b["model"] == "custom"][-1]
        assert sent["max_tokens"] == 10 and sent["truncate_prompt"] is True
        expect(custom.locator('[data-stat="tokens"]')).to_have_text("10")
        expect(page.locator("#generate")).to_be_focused()  # focus went to Stop while running, then back
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-forms-failure.png"), full_page=True)
        raise
    finally:
        context.close()


def test_page_reports_failures_as_failures(live_server: LiveServer, browser) -> None:
    """Found by an exploratory pass: a run whose requests all failed said "Done in 0.0 s"; "1e" in a number field
    was sent as nothing (the server's defaults); a stream cut short showed as done; a proxy's HTML error page was
    shown as markup; the GPT-2 title claimed 124M whatever was loaded."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    expect.set_options(timeout=60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the page is served with a strict Content-Security-Policy: nothing on it may be refused by it
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
    try:
        page.goto(live_server.url + "/")
        expect(page.locator("#api-key-box")).to_have_attribute("open", "")  # the first 401 opens it
        page.fill("#api-key", API_KEY)
        custom, gpt2 = page.locator("#panel-custom"), page.locator("#panel-gpt2")
        expect(page.locator("#title-custom .hint")).to_have_text(re.compile(r"^trained here, [\d.]+[KM] parameters$"))
        expect(page.locator("#title-gpt2 .hint")).to_have_text("pretrained")  # not loaded: no size to claim

        # A prompt longer than the context (512 here): the count says so before anything is sent...
        page.fill("#prompt", "word " * 600)
        expect(page.locator("#token-count")).to_contain_text("longer than the custom model's context (512 tokens")
        # ...and the run fails in both panels (400 and 503), which the status line says, in red.
        page.click("#generate")
        expect(custom.locator('[data-role="notice"]')).to_contain_text("Error 400")
        expect(custom.locator('[data-role="notice"]')).to_contain_text("Cut long prompts to fit")
        expect(page.locator("#form-status")).to_have_text("Neither model answered: see the panels.")
        expect(page.locator("#form-status")).to_have_class(re.compile(r"\berror\b"))

        # Text the browser cannot read as a number, and values out of range, are named before anything is sent.
        page.fill("#prompt", PROMPT)
        page.fill("#temperature", "")
        page.locator("#temperature").press_sequentially("1e")
        page.click("#generate")
        expect(page.locator("#form-status")).to_have_text("Temperature is not a number.")
        expect(page.locator("#temperature")).to_be_focused()
        page.fill("#temperature", "5")
        page.click("#generate")
        expect(page.locator("#form-status")).to_have_text("Temperature must be between 0 and 2.")
        page.fill("#temperature", "0.8")

        # A stream that stops without a finish reason, and a proxy's HTML error page.
        def cut_short(route) -> None:  # noqa: ANN001
            chunk = '{"id":"x","object":"text_completion","choices":[{"index":0,"text":" hi","finish_reason":null}]}'
            route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=f"data: {chunk}\n\n")

        page.route("**/v1/completions", cut_short)
        page.click("#generate")
        expect(custom.locator('[data-stat="finish"]')).to_have_text("interrupted")
        expect(custom.locator('[data-role="badge"]')).to_have_text("interrupted")
        expect(custom.locator('[data-role="notice"]')).to_contain_text("the connection closed")
        page.unroute("**/v1/completions")
        page.route(
            "**/v1/completions",
            lambda route: route.fulfill(status=502, content_type="text/html", body="<html><b>bad gateway</b></html>"),
        )
        page.click("#generate")
        expect(gpt2.locator('[data-role="notice"]')).to_contain_text("Error 502")
        assert "<html>" not in gpt2.locator('[data-role="notice"]').inner_text()
        page.unroute("**/v1/completions")
        assert errors == []
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-failures-failure.png"), full_page=True)
        raise
    finally:
        context.close()
