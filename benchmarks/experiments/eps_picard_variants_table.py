"""Prints the table of docs/experiments/eps-picard-warm-start.md from eps_picard_variants.py's JSON files."""
import json, sys
order = ["paradigms", "eps-picard", "span8", "span-w/4", "lsq-w/4", "coarse4", "coarse8", "coarse4-extrap", "coarse8-extrap", "coarse4-span8"]
print("| case | N | img | target | " + " | ".join(order) + " |")
print("|---|---|---|---|" + "---|" * len(order))
for f in sys.argv[1:]:
    d = json.load(open(f))
    for row in d["matched"]:
        pd = row.get("paradigms")
        cells = []
        for s in order:
            if s not in row: cells.append("–"); continue
            c = row[s]
            if c is None: cells.append("n/r"); continue
            v = c["sequential_calls"]
            cells.append(f"{v}" + (f" ({v / pd['sequential_calls']:.2f})" if pd and s != "paradigms" else ""))
        print(f"| {row['case']} | {row['steps']} | {d['images']} | {row['target']:g} | " + " | ".join(cells) + " |")
