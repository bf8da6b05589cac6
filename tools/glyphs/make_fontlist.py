#!/usr/bin/python3
"""Regenerates tools/glyphs/fonts.txt, the pinned list of font faces the glyph data set is
rendered from (run once after installing the packages; the list is committed, so rendering
never depends on what else is installed).

    /usr/bin/python3 tools/glyphs/make_fontlist.py > tools/glyphs/fonts.txt

Selection: the Latin text faces of the Debian packages in PACKAGES, filtered by RULES
(family -> design group and style class; faces whose style matches SKIP_STYLE are left out:
hairline/black weights, condensed and optical-size duplicates, scripts, symbols).  A face is
kept only if FreeType renders all 36 characters (0-9, A-Z) with real glyphs.

"group" is the design lineage (e.g. Nimbus Sans, TeX Gyre Heros, FreeSans, Arimo and
Liberation Sans are one Helvetica-like group) and the train / held-out split is by group, so
no clone of a held-out design is seen in training.  HELDOUT_GROUPS is pinned here.
"""
import re
import subprocess
import sys

from PIL import ImageFont

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

PACKAGES = [
    "fonts-adf-accanthis", "fonts-anonymous-pro", "fonts-cantarell", "fonts-cmu",
    "fonts-courier-prime", "fonts-croscore", "fonts-crosextra-caladea", "fonts-crosextra-carlito",
    "fonts-dejavu-core", "fonts-dejavu-extra", "fonts-ebgaramond", "fonts-firacode",
    "fonts-freefont-ttf", "fonts-gfs-didot", "fonts-go", "fonts-hack", "fonts-inconsolata",
    "fonts-inter", "fonts-jetbrains-mono", "fonts-lato", "fonts-liberation2",
    "fonts-linuxlibertine", "fonts-lmodern", "fonts-noto-core", "fonts-noto-mono",
    "fonts-open-sans", "fonts-oxygen", "fonts-roboto-unhinted", "fonts-sil-andika",
    "fonts-sil-charis", "fonts-sil-gentium", "fonts-stix", "fonts-texgyre", "fonts-urw-base35",
]

# (exact family name as FreeType reports it, group, class); families not listed are skipped.
RULES = [
    ("Accanthis ADF Std", "accanthis", "serif"),
    ("Anonymous Pro", "anonymous-pro", "mono"),
    ("Cantarell", "cantarell", "sans"),
    ("CMU Serif", "computer-modern", "serif"),
    ("CMU Concrete", "concrete", "serif"),
    ("CMU Sans Serif", "cm-sans", "sans"),
    ("CMU Bright", "cm-bright", "sans"),
    ("CMU Typewriter Text", "cm-typewriter", "mono"),
    ("Latin Modern Roman Dunhill", "computer-modern", "serif"),
    ("Latin Modern Roman Demi", "computer-modern", "serif"),
    ("Latin Modern Sans Quotation", "cm-sans", "sans"),
    ("Latin Modern Sans Demi Cond", "cm-sans", "sans"),
    ("Latin Modern Mono Light", "cm-typewriter", "mono"),
    ("Courier Prime", "courier", "mono"),
    ("Courier Prime Sans", "courier-prime-sans", "mono"),
    ("Arimo", "helvetica", "sans"),
    ("Liberation Sans", "helvetica", "sans"),
    ("Nimbus Sans", "helvetica", "sans"),
    ("Nimbus Sans Narrow", "helvetica", "sans"),
    ("TeX Gyre Heros", "helvetica", "sans"),
    ("TeX Gyre Heros Cn", "helvetica", "sans"),
    ("FreeSans", "helvetica", "sans"),
    ("Tinos", "times", "serif"),
    ("Liberation Serif", "times", "serif"),
    ("Nimbus Roman", "times", "serif"),
    ("TeX Gyre Termes", "times", "serif"),
    ("FreeSerif", "times", "serif"),
    ("STIXGeneral", "times", "serif"),
    ("Cousine", "liberation-mono", "mono"),
    ("Liberation Mono", "liberation-mono", "mono"),
    ("Nimbus Mono PS", "courier", "mono"),
    ("TeX Gyre Cursor", "courier", "mono"),
    ("FreeMono", "courier", "mono"),
    ("Caladea", "caladea", "serif"),
    ("Carlito", "carlito", "sans"),
    ("DejaVu Sans", "dejavu-sans", "sans"),
    ("DejaVu Serif", "dejavu-serif", "serif"),
    ("DejaVu Sans Mono", "dejavu-mono", "mono"),
    ("Hack", "dejavu-mono", "mono"),
    ("EB Garamond", "garamond", "serif"),
    ("Fira Code", "fira-code", "mono"),
    ("GFS Didot", "didot", "serif"),
    ("Go", "go", "sans"),
    ("Go Medium", "go", "sans"),
    ("Go Mono", "go-mono", "mono"),
    ("Inconsolata", "inconsolata", "mono"),
    ("Inter", "inter", "sans"),
    ("JetBrains Mono", "jetbrains-mono", "mono"),
    ("Lato", "lato", "sans"),
    ("Linux Libertine O", "libertine", "serif"),
    ("Linux Biolinum O", "biolinum", "sans"),
    ("Linux Libertine Mono O", "libertine-mono", "mono"),
    ("Noto Sans", "noto-sans", "sans"),
    ("Noto Sans Display", "noto-sans", "sans"),
    ("Noto Serif", "noto-serif", "serif"),
    ("Noto Serif Display", "noto-serif", "serif"),
    ("Noto Sans Mono", "noto-mono", "mono"),
    ("Noto Mono", "noto-mono", "mono"),
    ("Open Sans", "open-sans", "sans"),
    ("Oxygen-Sans", "oxygen", "sans"),
    ("Oxygen Mono", "oxygen-mono", "mono"),
    ("Roboto", "roboto", "sans"),
    ("Roboto Condensed", "roboto", "sans"),
    ("Andika", "andika", "sans"),
    ("Charis SIL", "charter", "serif"),
    ("Gentium", "gentium", "serif"),
    ("TeX Gyre Adventor", "avant-garde", "sans"),
    ("URW Gothic", "avant-garde", "sans"),
    ("TeX Gyre Bonum", "bookman", "serif"),
    ("URW Bookman", "bookman", "serif"),
    ("TeX Gyre Pagella", "palatino", "serif"),
    ("P052", "palatino", "serif"),
    ("TeX Gyre Schola", "schoolbook", "serif"),
    ("C059", "schoolbook", "serif"),
]

SKIP_STYLE = re.compile(r"thin|hairline|extra ?light|black|heavy|extra ?bold|condensed light|retina|"
                        r"^(?!10 )\d+ |^08 |upright", re.I)

# ~15% of the groups (by count of groups), spanning serif / sans / mono.
HELDOUT_GROUPS = {"palatino", "dejavu-sans", "jetbrains-mono", "andika", "concrete", "lato",
                  "didot", "oxygen-mono"}

BOLD = re.compile(r"bold|demi|semibold|semi bold", re.I)
ITALIC = re.compile(r"italic|oblique|slanted", re.I)


def has_all_glyphs(path):
    f = ImageFont.truetype(path, 48)
    missing = f.getmask("\U0010FFFD", mode="L")
    ref = (missing.size, bytes(missing))
    for ch in CHARS:
        m = f.getmask(ch, mode="L")
        if (m.size, bytes(m)) == ref or max(bytes(m) or b"\0") == 0:
            return False
    return True


def main():
    rules = {fam: (grp, cls) for fam, grp, cls in RULES}
    rows = []
    for pkg in PACKAGES:
        out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=True).stdout
        for path in out.splitlines():
            if not path.lower().endswith((".ttf", ".otf")):
                continue
            fam, style = ImageFont.truetype(path, 40).getname()
            if fam not in rules or SKIP_STYLE.search(style):
                continue
            if pkg == "fonts-lmodern" and not style.startswith(("10 ", "8 ")):
                continue
            if not has_all_glyphs(path):
                print("skip (missing glyphs): %s" % path, file=sys.stderr)
                continue
            grp, cls = rules[fam]
            # the file name too: Courier Prime's faces all report the style "Light"
            base = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            bold = int(bool(BOLD.search(style) or BOLD.search(fam) or BOLD.search(base)))
            italic = int(bool(ITALIC.search(style) or ITALIC.search(base)))
            split = "heldout" if grp in HELDOUT_GROUPS else "train"
            rows.append((split, grp, fam, style, bold, italic, cls, pkg, path))
    rows.sort(key=lambda r: (r[0] != "train", r[1], r[2], r[3], r[8]))
    print("# glyph fonts: one face per line, tab-separated; generated by tools/glyphs/make_fontlist.py")
    print("# columns: split group family style bold italic class package path")
    print("# split is by design group (clones of one design share a group); %d faces, %d groups"
          % (len(rows), len({r[1] for r in rows})))
    for r in rows:
        print("\t".join(str(x) for x in r))


if __name__ == "__main__":
    main()
