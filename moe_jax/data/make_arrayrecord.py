"""Command line: text / JSONL files -> pre-tokenized ArrayRecord windows (data.arrayrecord).

    python -m moe_jax.data.make_arrayrecord --out=/data/train.array_record --text_len=128 \
        --tokenizer=/path/to/checkpoint a.txt b.jsonl          # or --tokenizer=byte
"""

from __future__ import annotations

import argparse
import sys

from moe_jax.data.arrayrecord import convert
from moe_jax.data.hf_tokenizer import load_tokenizer
from moe_jax.data.tokenizer import ByteTokenizer


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moe_jax.data.make_arrayrecord",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="text files (one document each) or .jsonl files")
    p.add_argument("--out", required=True, help="the ArrayRecord file to write")
    p.add_argument("--text_len", type=int, required=True, help="data.text_len of the runs")
    p.add_argument("--tokenizer", default="byte", help="byte, or a tokenizer.json / its folder")
    a = p.parse_args(argv)
    if a.text_len < 1:
        p.error(f"--text_len must be >= 1 (windows of text_len + 1 ids), got {a.text_len}")
    tok = ByteTokenizer() if a.tokenizer == "byte" else load_tokenizer(a.tokenizer)
    n = convert(a.inputs, a.out, text_len=a.text_len, tokenizer=tok, tokenizer_name=a.tokenizer)
    print(f"wrote {n} windows of {a.text_len + 1} tokens to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
