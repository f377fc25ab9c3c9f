"""The chat page in a real headless browser (Debian's chromium and chromedriver, driven by
Selenium): it loads, streams an answer, renders markdown code blocks, shows model output that
holds HTML and script as text (nothing from it runs), and its Stop button ends a long answer and
frees the server's slot. A screenshot lands in the test's folder.

The model is a real pocketlm Llama whose weights are set to follow a script: each token's output
favours the next token of the script (the attention and MLP outputs are zero, so the residual
stream is the token's own embedding and the head reads it), ending in a loop that never stops."""

import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from tokenizers import AddedToken  # noqa: E402

from test_server import CHATML, CONFIG, LiveServer  # noqa: E402
from pocketlm import ModelConfig  # noqa: E402
from pocketlm.api import CausalLM  # noqa: E402
from pocketlm.chat import ChatSession  # noqa: E402
from pocketlm.server.app import Service, create_app  # noqa: E402
from pocketlm.tokenizer import Tokenizer  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")

# the answer, one token each: HTML and script that must show as text, a fenced code block, a loop
SCRIPT = ["Here ", "<img src=x onerror=\"document.title='pwned'\">", " and ", "<script>document.title='pwned'</script>",
          "\n\n```python\n", "print('hi')", "\n```\n\n", "la "]


def scripted(tmp_path):
    tok = Tokenizer.train_from_iterator(["the user asks and the assistant answers. " * 50], vocab_size=280,
                                        bos_token="<s>", eos_token="</s>",
                                        special_tokens=("<s>", "</s>", "<|im_start|>", "<|im_end|>"))
    tok.backend.add_tokens([AddedToken(t, normalized=False) for t in SCRIPT])
    tok.chat_template = CHATML
    ids = [tok.convert_tokens_to_ids(t) for t in SCRIPT]
    assert len(set(ids)) == len(SCRIPT) and max(ids) < CONFIG["vocab_size"]
    prompt_end = ChatSession(tok, 256, max_new_tokens=1).encode([{"role": "user", "content": "hello"}])[-1]
    follows = {prompt_end: ids[0], **dict(zip(ids, ids[1:])), ids[-1]: ids[-1]}  # "la " forever

    torch.manual_seed(0)
    model = CausalLM.from_config(ModelConfig(**{**CONFIG, "tie_embeddings": False})).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream stays the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.model.embed_tokens.weight
        normed = embeddings / embeddings.pow(2).mean(-1, keepdim=True).sqrt()
        head = torch.zeros_like(model.lm_head.weight)
        for token, following in follows.items():
            head[following] += normed[token] / normed.shape[1] * 30
        model.lm_head.weight.copy_(head)
    model.config.eos_token_id = None
    return model, tok


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_page_streams_renders_safely_and_stops(tmp_path, browser):
    from selenium.webdriver.common.by import By

    model, tokenizer = scripted(tmp_path)
    service = Service("scripted", model, tokenizer, parallel=2, context=512)
    server = LiveServer(create_app(service))
    try:
        browser.get(server.url + "/")
        title = browser.title
        wait_for(lambda: "scripted" in browser.find_element(By.ID, "model").text, "the model name")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("400")
        browser.find_element(By.ID, "temperature").send_keys("0")  # focus; the value is set below
        browser.execute_script("document.getElementById('temperature').value = '0'")
        browser.find_element(By.ID, "input").send_keys("hello")
        browser.find_element(By.ID, "send").click()

        def answer():  # one consistent look at the last answer (it re-renders as tokens arrive)
            return browser.execute_script("""
                const all = document.querySelectorAll('.message.assistant');
                const node = all[all.length - 1];
                if (!node) return null;
                const code = node.querySelector('pre code.language-python');
                return {text: node.innerText, images: node.querySelectorAll('img').length,
                        scripts: node.querySelectorAll('script').length, code: code && code.textContent};""")
        wait_for(lambda: (answer() or {}).get("text", "").count("la") >= 3, "the streamed answer")
        seen = answer()
        assert "<img src=x onerror=\"document.title='pwned'\">" in seen["text"]
        assert "<script>document.title='pwned'</script>" in seen["text"]
        assert seen["images"] == 0 and seen["scripts"] == 0
        assert browser.execute_script("return document.title") == title
        assert seen["code"] == "print('hi')"

        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: browser.find_element(By.ID, "status").text == "stopped", "the stop")
        stopped_at = answer()["text"]
        wait_for(lambda: service.scheduler.active == 0, "the slot to be freed")
        time.sleep(0.3)
        assert answer()["text"] == stopped_at  # nothing arrives after Stop
        assert stopped_at.count("la") < 390  # it stopped before max_tokens
        assert browser.find_element(By.ID, "send").is_enabled()
        browser.save_screenshot(str(tmp_path / "chat-page.png"))
        assert (tmp_path / "chat-page.png").stat().st_size > 1000

        # "show probabilities": each token a span coloured by its probability, alternatives on hover
        browser.find_element(By.ID, "clear").click()
        browser.find_element(By.ID, "show-probs").click()
        browser.find_element(By.ID, "input").send_keys("hello")
        browser.find_element(By.ID, "send").click()
        def tokens():
            return browser.execute_script("""
            return Array.from(document.querySelectorAll('.message.assistant .token')).slice(0, 3).map(
                (s) => ({text: s.textContent, title: s.title, colour: s.style.backgroundColor}));""")
        wait_for(lambda: len(tokens()) >= 3, "coloured tokens")
        browser.find_element(By.ID, "stop").click()
        first = tokens()
        assert [t["text"] for t in first] == SCRIPT[:3]
        assert all(t["colour"].startswith("rgb") and t["title"].startswith("p = ") for t in first)
        assert first[0]["title"].count("%") == 6  # its own probability and five alternatives
        wait_for(lambda: service.scheduler.active == 0, "the slot to be freed")
    finally:
        server.stop()
