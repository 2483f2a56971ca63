"""Write a JSONL dataset of prompts whose answers copy their input: each shows a Python function
of this repository and asks for it again, reformatted. Speculative decoding by prompt lookup
(``--speculative-config '{"method": "ngram", ...}'``) is for such workloads (code edits, quotes,
extraction); ``compare_vllm.sh`` serves it with ``SPEC=1``.

Usage: python benchmarks/copy_prompts.py OUT.jsonl [--num-prompts 32] [--output-len 200]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def functions(min_chars: int = 300, max_chars: int = 900) -> list[str]:
    """The source of every function of the package of this size, in a fixed order."""
    found = []
    for path in sorted((ROOT / "pagedserve").rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_source_segment(source, node)
                if text and min_chars < len(text) < max_chars:
                    found.append(text)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = functions()
    random.Random(args.seed).shuffle(chosen)
    with args.out.open("w") as f:
        for code in chosen[: args.num_prompts]:
            prompt = (
                f"Original code:\n```python\n{code}\n```\n\n"
                "The same code, reformatted:\n```python\n"
            )
            f.write(json.dumps({"prompt": prompt, "output_len": args.output_len}) + "\n")


if __name__ == "__main__":
    main()
