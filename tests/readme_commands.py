"""The README's Quickstart commands, read from README.md itself.

.ci/run runs them exactly as written (``python3 tests/readme_commands.py demo``
prints the first one), and tests/test_readme.py checks that they are still
there, so the README and CI cannot drift apart. Standard library only: CI calls
it before any virtual environment exists.
"""

from __future__ import annotations

import os
import re
import sys

README = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"
)
SECTION = "## Quickstart"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def quickstart_commands(text: str) -> dict[str, str]:
    """``{"demo": ..., "test": ...}``: the Quickstart's first two bash blocks.

    The first installs and runs the demo, the second installs and runs the test
    suite. Each block is one command line.
    """
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = [b.strip() for b in BLOCK.findall(section)]
    if len(blocks) < 2:
        msg = f"README.md's {SECTION!r} needs two bash blocks, has {len(blocks)}"
        raise ValueError(msg)
    for block in blocks[:2]:
        if "\n" in block:
            msg = f"a Quickstart command must be one line: {block!r}"
            raise ValueError(msg)
    return {"demo": blocks[0], "test": blocks[1]}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("demo", "test"):
        print("usage: readme_commands.py demo|test", file=sys.stderr)
        return 2
    with open(README, encoding="utf-8") as f:
        print(quickstart_commands(f.read())[argv[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
