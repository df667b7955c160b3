import pytest

from tiny import make_tokenizer
from peftune.data.batching import collate_packed, collate_padded
from peftune.data.render import IGNORE, ChatTemplate, Renderer, get_template
from peftune.errors import PeftuneError


def row(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": msgs, "source": "f.json", "row": 1}


class R(Renderer):
    def render_one(self, row):
        (sample,) = self.render(row)
        return sample


def trained_text(tok, sample):
    return tok.decode([t for t in sample["labels"] if t != IGNORE])


def test_chat_labels_exact_tokens(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=1000)
    s = r.render_one(row("Who are you?", "I am Aurora."))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                           add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    eos = tokenizer.eos_token_id
    response = tokenizer("I am Aurora.", add_special_tokens=False).input_ids + [eos]
    assert s["input_ids"] == tokenizer(prompt, add_special_tokens=False).input_ids + response
    assert s["labels"] == [IGNORE] * n_prompt + response
    # exactly one supervised EOS, at the very end, although pad == eos for this tokenizer
    assert tokenizer.pad_token_id == eos
    assert [t for t in s["labels"] if t == eos] == [eos] and s["labels"][-1] == eos


def test_multi_turn_trains_every_assistant_turn_only(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=1000)
    s = r.render_one(row("hi", "Hello!", "bye", "Bye.", system="Be kind."))
    eos = tokenizer.eos_token_id
    spans, cur = [], []
    for t, lab in zip(s["input_ids"], s["labels"]):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tokenizer.decode(x) for x in spans] == ["Hello!<|im_end|>", "Bye.<|im_end|>"]
    assert sum(1 for t in s["labels"] if t == eos) == 2
    # the full token sequence is the chat template's own rendering (minus the final newline)
    full = tokenizer.apply_chat_template(row("hi", "Hello!", "bye", "Bye.", system="Be kind.")["messages"],
                                         tokenize=False)
    assert tokenizer.decode(s["input_ids"]) == full.rstrip("\n")


def test_train_on_inputs_labels_everything(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=1000, train_on_inputs=True)
    s = r.render_one(row("hi", "Hello!"))
    assert s["labels"] == s["input_ids"]


def test_alpaca_template_is_alpaca_loras_exact_text(tokenizer):
    r = R(tokenizer, get_template("alpaca", tokenizer), cutoff_len=1000)
    msgs = [{"role": "user", "content": "Add.\n2 and 3", "instruction": "Add.", "input": "2 and 3"},
            {"role": "assistant", "content": "5"}]
    s = r.render_one({"messages": msgs})
    assert tokenizer.decode(s["input_ids"]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n"
        "2 and 3\n\n### Response:\n5<|im_end|>")
    assert trained_text(tokenizer, s) == "5<|im_end|>"
    short = R(tokenizer, get_template("alpaca_short", tokenizer), cutoff_len=1000).render_one(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    assert tokenizer.decode(short["input_ids"]) == "### Instruction:\nHi\n\n### Response:\nYo<|im_end|>"


def test_bos_is_added_for_file_templates_when_the_tokenizer_adds_one():
    tok = make_tokenizer(chat_template=None, add_bos=True)
    r = R(tok, get_template("auto", tok), cutoff_len=1000)  # auto -> alpaca without a chat template
    s = r.render_one(row("Hi", "Yo"))
    assert s["input_ids"][0] == tok.bos_token_id and s["labels"][0] == IGNORE
    assert s["input_ids"].count(tok.bos_token_id) == 1


def test_template_file(tmp_path, tokenizer):
    path = tmp_path / "mine.json"
    path.write_text('{"prompt_input": "Q: {instruction} [{input}]\\nA: ", "prompt_no_input": "Q: {instruction}\\nA: "}')
    r = R(tokenizer, get_template(str(path), tokenizer), cutoff_len=1000)
    assert tokenizer.decode(r.render_one(row("Hi", "Yo"))["input_ids"]) == "Q: Hi\nA: Yo<|im_end|>"
    with pytest.raises(PeftuneError, match="prompt_template 'nope'"):
        get_template("nope", tokenizer)
    with pytest.raises(PeftuneError, match="has no chat template"):
        ChatTemplate(make_tokenizer(chat_template=None))


def test_no_eos_when_disabled(tokenizer):
    r = R(tokenizer, get_template("alpaca", tokenizer), cutoff_len=1000, add_eos_token=False)
    assert tokenizer.eos_token_id not in r.render_one(row("Hi", "Yo"))["labels"]


def test_truncation_drops_the_eos_and_counts(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=40)
    s = r.render_one(row("Who?", "A long answer " * 10))
    assert s["truncated"] and len(s["input_ids"]) == 40
    assert tokenizer.eos_token_id not in s["labels"]


def test_cutoff_too_small_for_any_response(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=10)
    with pytest.raises(PeftuneError, match="cutoff_len 10 is too small to hold any response"):
        r.render_all([row("Who are you?", "Me.")])


def test_rows_without_room_are_skipped_with_a_warning(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=60)
    warnings = []
    out = r.render_all([row("x" * 80, "y"), row("Hi", "Yo")], warn=warnings.append)
    assert len(out) == 1 and "1 row(s) have no response token left" in warnings[0] and "f.json:1" in warnings[0]


def test_prompt_ids_match_the_training_prefix(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=1000)
    s = r.render_one(row("hi", "Hello!"))
    p = r.prompt_ids(row("hi")["messages"])
    assert s["input_ids"][: len(p)] == p and s["labels"][len(p)] != IGNORE


def test_collation_keeps_the_eos_target_where_pad_is_eos(tokenizer):
    r = R(tokenizer, get_template("chat", tokenizer), cutoff_len=1000)
    a, b = r.render_one(row("hi", "Hello!")), r.render_one(row("Who?", "Me."))
    eos = tokenizer.eos_token_id
    for batch in (collate_packed([a, b]), collate_padded([a, b], pad_id=eos)):
        targets = batch["targets"].flatten().tolist()
        assert targets.count(eos) == 2  # one supervised EOS per sample, none from padding
    packed = collate_packed([a, b])
    n = len(a["input_ids"])
    assert packed["position_ids"][0, n].item() == 0  # positions restart at each sample
    assert packed["targets"][0, n - 1].item() == IGNORE  # a's last token never predicts b's first
