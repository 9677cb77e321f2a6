"""Write workflow/plots/offline.html: the page template `dvc plots show` fills (.dvc/config
`plots.html_template`), with vega, vega-lite and vega-embed inlined, so that the plots draw on a
machine without internet (most compute clusters). DVC's own template loads them from a CDN and
draws nothing offline.

The versions are the ones DVC's template names (dvc_render/vega.py); the files come from npm
(`npm pack`), and their sha512 integrity is written beside them into the template's header.
Usage: python scripts/vendor_vega.py [--out workflow/plots/offline.html]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
#: what dvc_render's HTML.embed replaces in a template
DVC_PLACEHOLDERS = ("scripts", "plot_divs", "refresh_tag")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- deit-repro: scripts/vendor_vega.py wrote this template; {sources}.
         DVC's scripts placeholder (the CDN) is left out on purpose. -->
{inline}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "workflow" / "plots" / "offline.html")
    args = ap.parse_args()
    scripts, sources = [], []
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
        packed = subprocess.run(
            ["npm", "pack", "--json", *specs], cwd=tmp, check=True, capture_output=True, text=True
        )
        for entry in json.loads(packed.stdout):
            with tarfile.open(Path(tmp, entry["filename"])) as tar:
                member = f"package/build/{entry['name']}.min.js"
                code = tar.extractfile(member).read().decode("utf-8")
            if "</script" in code or any(f"{{{k}}}" in code for k in DVC_PLACEHOLDERS):
                raise SystemExit(
                    f"{entry['id']}: its code closes a <script> tag or holds a placeholder DVC "
                    "fills; cannot inline"
                )
            scripts.append(f"    <script>/* {entry['id']} */\n{code}\n    </script>")
            sources.append(f"{entry['id']} ({entry['integrity']})")
    page = PAGE.format(sources="; ".join(sources), inline="\n".join(scripts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out} ({len(page) / 1e6:.1f} MB): {', '.join(sources)}")


if __name__ == "__main__":
    main()
