"""Chat templates against transformers' apply_chat_template, the sandbox, and history truncation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors

from pocketlm.chat import PLAIN_STOP, PLAIN_TEMPLATE, ChatSession, render_chat
from pocketlm.errors import ConfigError, ContextLengthError, TokenizerError
from pocketlm.tokenizer import Tokenizer

CHATML = (  # SmolLM2-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (  # bos/eos variables, raise_exception, loop.index0, .strip()
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# multi-line with indentation: only equal to transformers when trim_blocks/lstrip_blocks match;
# also namespace(), loop.last, tojson (non-ASCII and HTML characters unescaped) and `tools` = None
MULTILINE = """{% set ns = namespace(users=0) %}
{% for message in messages %}
    {% if message['role'] == 'user' %}
        {% set ns.users = ns.users + 1 %}
<|user|> #{{ ns.users }}
{{ message['content'] }}{{ eos_token }}
    {% elif message['role'] == 'system' %}
<|system|>
{{ message | tojson }}{{ eos_token }}
    {% else %}
<|assistant|>
{{ message['content'] }}{% if not loop.last %}{{ eos_token }}{% endif %}
    {% endif %}
{% endfor %}
{% if tools is none %}no tools{% endif %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "multiline": MULTILINE}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be <brief> & kind, élève."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Hello!\n"}, {"role": "user", "content": "{{ not a template }}"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    text = path / "t.txt"
    text.write_text("the user asks and the assistant answers, briefly and kindly. " * 80)
    tokenizer = Tokenizer.train([text], vocab_size=300, bos_token="<s>", eos_token="</s>",
                                special_tokens=("<s>", "</s>", "<|im_start|>", "<|im_end|>"))
    # like Llama's tokenizer, add <s> when encoding text, so that encoding a rendered prompt the
    # ordinary way would give a second bos (the template already wrote one)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def _ours(template, messages, tokenizer, add_generation_prompt):
    return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(name, conversation, add_generation_prompt, tokenizer, reference):
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    assert _ours(TEMPLATES[name], messages, tokenizer, add_generation_prompt) == expected


@settings(max_examples=40, deadline=None)
@given(contents=st.lists(st.text(max_size=30), min_size=1, max_size=5), system=st.none() | st.text(max_size=20))
def test_any_text_renders_like_transformers(contents, system, tokenizer, reference):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    for template in (CHATML, MULTILINE):
        expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        assert _ours(template, messages, tokenizer, True) == expected


@pytest.mark.parametrize("name", ["chatml", "llama2"])
def test_session_ids_match_transformers_tokenized(name, tokenizer, reference):
    messages = CONVERSATIONS[1][:2]
    session = ChatSession(tokenizer, window=128, template=TEMPLATES[name])
    expected = reference.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=True,
                                             add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert session.encode(messages) == list(expected)
    assert session.encode(messages).count(tokenizer.bos_token_id) == (name == "llama2")


def test_stop_token_ids_come_from_the_template(tokenizer):
    session = ChatSession(tokenizer, window=128)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert session.stop_token_ids == [im_end] and session.stop == []


def test_raise_exception_in_the_template(tokenizer, reference):
    import jinja2

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError):
        reference.apply_chat_template(bad, chat_template=LLAMA2, tokenize=False)
    with pytest.raises(TokenizerError, match="roles must alternate"):
        _ours(LLAMA2, bad, tokenizer, False)


def test_missing_special_tokens_are_undefined_not_none():
    # transformers leaves out special tokens a tokenizer lacks, so {{ bos_token }} prints nothing
    assert render_chat("[{{ bos_token }}]", [{"role": "user", "content": "x"}]) == "[]"
    rendered = render_chat("{{ enable_thinking }}", [{"role": "user", "content": "x"}], enable_thinking=False)
    assert rendered == "False"


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'injected'}) %}",
    "{% set _ = messages[0].update({'content': 'changed'}) %}",
    "{% set _ = dict.update(messages[0], {'content': 'changed'}) %}",
    "{% set _ = messages[0].pop('content') %}",
    "{% set m = messages[0] %}{% set m.content = 'changed' %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_blocks_escapes_and_writes(template):
    messages = [{"role": "user", "content": "original"}]
    with pytest.raises(TokenizerError, match="chat template"):
        render_chat(template, messages)
    assert messages == [{"role": "user", "content": "original"}]


def test_template_errors_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="syntax error on line 2"):
        render_chat("ok\n{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="TypeError"):
        render_chat("{{ 1 + messages[0]['content'] }}", [{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="non-empty"):
        render_chat("", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages", [
    [], None, "hello", [("user", "hi")], [{"role": "user"}], [{"content": "hi"}],
    [{"role": "", "content": "hi"}], [{"role": "user", "content": 3}], [{"role": "user", "content": None}],
    [{"role": "user", "content": "hi", "extra": object()}],
])
def test_bad_messages_are_config_errors(messages):
    with pytest.raises(ConfigError):
        render_chat(CHATML, messages)


def test_plain_fallback_without_a_template(folder):
    tokenizer = Tokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    session = ChatSession(tokenizer, window=128, system="Be brief.")
    assert session.plain and session.template == PLAIN_TEMPLATE
    session.add("user", "Hi")
    session.add("assistant", "Hello.")
    session.add("user", "Bye")
    assert session.render() == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert session.stop == [PLAIN_STOP] == ["\nUser:"] and session.stop_token_ids == []


def _conversation(session, turns, words=6):
    for i in range(turns):
        session.add("user", f"question {i}: " + "the user asks " * words)
        session.add("assistant", f"answer {i}: " + "the assistant answers " * words)


def test_history_drops_oldest_turns_and_keeps_system_and_last_user(tokenizer):
    window, reply = 128, 16
    session = ChatSession(tokenizer, window=window, system="Be brief.", max_new_tokens=reply)
    _conversation(session, turns=6)
    session.add("user", "the last question")
    full = len(session.encode(session.conversation()))
    assert full + reply > window  # the conversation really outgrew the window

    prompt = session.prompt()
    assert prompt.dropped > 0 and len(prompt.ids) + reply <= window
    assert session.messages[-1] == {"role": "user", "content": "the last question"}
    assert session.messages[0]["role"] == "user"  # whole turns go, not half of one
    assert session.messages[0]["content"].startswith(f"question {prompt.dropped}:")
    assert len(session.messages) == 2 * (6 - prompt.dropped) + 1
    text = tokenizer.decode(prompt.ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "question 0:" not in text
    # it dropped no more than it had to: one more turn back would not have fitted
    restored = [{"role": "user", "content": f"question {prompt.dropped - 1}: " + "the user asks " * 6},
                {"role": "assistant", "content": f"answer {prompt.dropped - 1}: " + "the assistant answers " * 6}]
    assert len(session.encode(session._system_messages() + restored + session.messages)) + reply > window
    assert prompt.ids == session.encode()  # and the ids are the rendering of what was kept

    assert session.prompt().dropped == 0  # dropped turns stay dropped: no second notice


def test_a_latest_message_that_cannot_fit_raises(tokenizer):
    session = ChatSession(tokenizer, window=64, system="Be brief.", max_new_tokens=16)
    _conversation(session, turns=1, words=1)
    session.add("user", "the user asks " * 40)
    before = list(session.messages)
    with pytest.raises(ContextLengthError, match="context window of 64"):
        session.prompt()
    assert session.messages == before  # nothing dropped for a prompt that was refused


def test_session_reset_and_order_rules(tokenizer):
    session = ChatSession(tokenizer, window=128, system="S")
    with pytest.raises(ConfigError, match="end with a user message"):
        session.prompt()
    session.add("user", "hi")
    session.add("assistant", "hello")
    with pytest.raises(ConfigError, match="end with a user message"):
        session.prompt()
    with pytest.raises(ConfigError):
        session.add("user", None)
    session.reset()
    assert session.messages == [] and session.conversation() == [{"role": "system", "content": "S"}]
    with pytest.raises(ContextLengthError):
        ChatSession(tokenizer, window=128, max_new_tokens=128)


@pytest.mark.parametrize("template,message", [
    ("{{ 'x' * 10**10 }}", "repetition"),
    ("{{ [1] * 10**9 }}", "repetition"),
    ("{{ 9 ** 999999 }}", "too large a number"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "looped more than"),
    ("{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}", "output passed"),
    ("{# padding #}" + "x" * 70_000, "refuses more than"),
])
def test_templates_that_would_allocate_or_loop_without_bound_are_stopped(template, message):
    with pytest.raises(TokenizerError, match=message):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_budgets_leave_ordinary_arithmetic_and_loops_alone():
    template = "{% for i in range(3) %}{{ i }}{% endfor %}|{{ 2 ** 10 }}|{{ 'ab' * 3 }}|{{ messages | length }}"
    assert render_chat(template, [{"role": "user", "content": "hi"}]) == "012|1024|ababab|1"
