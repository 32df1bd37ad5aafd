"""Plain text -> jsonl documents (one per blank-line-separated block), spread over N files.

`prep tokenize` reads a .txt file as one document; the demo and the tests want many documents (a validation
split of whole documents) in several files (several tokenize array tasks). Written atomically and skipped
when the output is already there, so reruns of the demo reuse it.

    python slurm/split_text.py ../shared/data/tinyshakespeare.txt demo/input --files 2
"""
import argparse
import json
import os
import sys
from pathlib import Path


def split(text_path: Path, out_dir: Path, files: int) -> list[Path]:
    blocks = [b.strip() for b in text_path.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    if len(blocks) < files:
        raise ValueError(f"{text_path} has {len(blocks)} documents, fewer than --files {files}")
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(blocks) // files)
    outputs = []
    for i in range(files):
        path = out_dir / f"{text_path.stem}_{i:03d}.jsonl"
        outputs.append(path)
        if path.exists():
            continue
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for j, block in enumerate(blocks[i * per_file:(i + 1) * per_file], start=i * per_file):
                f.write(json.dumps({"id": f"{text_path.stem}-{j}", "text": block}) + "\n")
        os.replace(tmp, path)
    return outputs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", type=Path, help="a UTF-8 text file")
    p.add_argument("out", type=Path, help="directory for the .jsonl files")
    p.add_argument("--files", type=int, default=2, help="number of output files (default 2)")
    args = p.parse_args(argv)
    if args.files < 1:
        print(f"error: --files must be >= 1, got {args.files}", file=sys.stderr)
        return 2
    try:
        for path in split(args.text, args.out, args.files):
            print(path)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
