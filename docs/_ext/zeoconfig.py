"""``.. zeo-config:: FILE SECTIONTYPE``: a table of a ZConfig section type's keys.

Read straight from ``src/ZEO/<FILE>`` (``server.xml``, ``component.xml``), so the reference
cannot drift from the schema: every key, its type, default and description.
"""

from __future__ import annotations

import os
import textwrap
import xml.etree.ElementTree as ET

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "src", "ZEO")


def _text(elem) -> str:
    desc = elem.find("description")
    if desc is None or not desc.text:
        return ""
    return " ".join(desc.text.split())


def section_keys(filename: str, sectiontype: str) -> list[dict]:
    """The keys and subsections of ``sectiontype`` in ``src/ZEO/<filename>``."""
    root = ET.parse(os.path.join(SRC, filename)).getroot()
    for st in root.iter("sectiontype"):
        if st.get("name") == sectiontype:
            break
    else:
        raise ValueError(f"no sectiontype {sectiontype!r} in {filename}")
    rows = []
    for child in st:
        if child.tag in ("key", "multikey"):
            rows.append({
                "name": child.get("name"),
                "type": child.get("datatype", "string"),
                "default": child.get("default"),
                "required": child.get("required") == "yes",
                "multi": child.tag == "multikey",
                "description": _text(child),
            })
        elif child.tag == "section":
            rows.append({
                "name": f"<{child.get('type')}>",
                "type": "section",
                "default": None,
                "required": child.get("required") == "yes",
                "multi": False,
                "description": f"See the ``<{child.get('type')}>`` section.",
            })
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if text else ""


class ZEOConfigDirective(Directive):
    required_arguments = 2
    has_content = False

    def run(self):
        filename, sectiontype = self.arguments
        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 22 18 12 48",
            "",
            "   * - Key",
            "     - Type",
            "     - Default",
            "     - Meaning",
        ]
        for row in section_keys(filename, sectiontype):
            name = f"``{row['name']}``"
            if row["required"]:
                name += " (required)"
            if row["multi"]:
                name += " (repeatable)"
            default = row["default"]
            if default is None:
                default = ""
            elif default == "":
                default = '``""``'
            else:
                default = f"``{default}``"
            lines += [
                f"   * - {name}",
                f"     - {row['type']}",
                f"     - {default}",
                "     - " + (_cell(row["description"]) or "\\ "),
            ]
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(textwrap.dedent("\n".join(lines)).splitlines()),
                                self.content_offset, node)
        return node.children


def setup(app):
    app.add_directive("zeo-config", ZEOConfigDirective)
    return {"parallel_read_safe": True, "version": "1"}
