"""Incremental detokenization and stop strings in the output processor."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from vlm_engine.frontend.output_processor import IncrementalDetokenizer, OutputProcessor
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.vocab.protocol import EngineCoreOutput

pytestmark = pytest.mark.transformers

UNICODE = "héllo wörld 日本語のテキスト 🎉🚀 done\n\nnext ✓"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("t")))


def test_multibyte_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(UNICODE, add_special_tokens=False)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) >= 8  # byte-fallback tokens: split chars
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    deltas = [detok.add_tokens([i]) for i in ids]
    assert "".join(deltas) == UNICODE
    assert not any("\ufffd" in d for d in deltas)


def test_chunks_of_several_tokens(tokenizer):
    ids = tokenizer.encode(UNICODE, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    text = "".join(detok.add_tokens(ids[i : i + 3]) for i in range(0, len(ids), 3))
    assert text == UNICODE


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("<start_of_turn>hi", add_special_tokens=False)
    assert IncrementalDetokenizer(tokenizer, True).add_tokens(ids) == "hi"
    assert IncrementalDetokenizer(tokenizer, False).add_tokens(ids) == "<start_of_turn>hi"


def feed(processor, request_id, ids):
    outs = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        core = EngineCoreOutput(request_id, [token], finish_reason="length" if last else None)
        results, stopped = processor.process([core])
        outs += results
        if stopped:
            break
    return outs, stopped


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tokenizer, include):
    text = "the red circle sits left of a blue square"
    ids = tokenizer.encode(text, add_special_tokens=False)
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop=["blue", "circle s"], include_stop_str_in_output=include)
    processor.add_request("r", None, params, num_prompt_tokens=3, arrival_time=0.0)
    outs, stopped = feed(processor, "r", ids)
    assert stopped == ["r"] and outs[-1].finished and outs[-1].finish_reason == "stop"
    assert outs[-1].stop_reason == "circle s"
    assert outs[-1].text == ("the red circle s" if include else "the red ")
    assert "r" not in processor.states


def test_streamed_deltas_never_show_part_of_a_stop_string(tokenizer):
    text = "the red circle sits left of a blue square"
    ids = tokenizer.encode(text, add_special_tokens=False)
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop=["blue square"])
    processor.add_request("r", None, params, 3, 0.0, stream=True)
    outs, _ = feed(processor, "r", ids)
    shown = ""
    for out in outs:
        shown += out.text
        assert "blue" not in shown
    assert shown == "the red circle sits left of a "
    assert sum(len(o.token_ids) for o in outs) == len(ids)
