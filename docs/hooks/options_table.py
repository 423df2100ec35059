"""mkdocs hook: replace `<!-- catalog:options ENTRY -->` with the entry's options table.

The table is generated from the option declarations, so the docs cannot drift
from the code.
"""

from __future__ import annotations

import re
from typing import Any

MARKER = re.compile(r"<!-- catalog:options (\w+) -->")
CONFIG_MARKER = "<!-- catalog:config-reference -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    from catalog.docs import config_reference, options_table

    markdown = MARKER.sub(lambda m: options_table(m.group(1)), markdown)
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference())
    return markdown
