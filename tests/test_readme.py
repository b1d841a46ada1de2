"""The README's commands work as written: every documented `python SCRIPT.py ...` / `torchrun ... SCRIPT.py ...`
command is accepted by that script's own flag parser (placeholders such as DATA stay as they are: parsing
touches no file), and every documented `--smoke` command runs to the end and logs its ETA."""
import os, re, shlex

import pytest

import diffusion_decay
import mae_decay
import selfmodel
import sim_cifar
from conftest import ROOT, need, side_by_side

PARSERS = {  # script -> f(argv, world_size): the parse the script itself does first
    "sim_cifar": lambda argv, world: sim_cifar.parse_args(argv),
    "mae_decay": lambda argv, world: mae_decay.parse_args(argv),
    "diffusion_decay": lambda argv, world: diffusion_decay.get_args(argv, world_size=world),
    "selfmodel": lambda argv, world: selfmodel.get_args(argv),
}
COMMAND = re.compile(r"(?:python|torchrun --nproc_per_node (\d+)) ([a-z_]+)\.py((?: +[^\s`#|]+)*)")


def readme_commands():
    """[(script, argv, world size)] of every documented command of the four training scripts."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    out = []
    for m in COMMAND.finditer(text):
        if m.group(2) in PARSERS:
            out.append((m.group(2), shlex.split(m.group(3)), int(m.group(1) or 1)))
    return out


def test_readme_documents_every_script_and_its_smoke_command():
    found = readme_commands()
    assert {s for s, _, _ in found} == set(PARSERS)
    assert sorted(s for s, argv, _ in found if argv == ["--smoke"]) == sorted(PARSERS)


@pytest.mark.parametrize("script,argv,world", readme_commands(),
                         ids=[f"{s} {' '.join(a)}" for s, a, _ in readme_commands()])
def test_readme_command_parses(script, argv, world, tmp_path):
    PARSERS[script](argv + ["--out", str(tmp_path)], world)  # --out: parsing writes nothing, but be sure


@pytest.fixture(scope="module")
def smoke_data(data_dir, readme_smoke):
    need(data_dir, "cifar10", "cifar-10-batches-py")
    need(data_dir, "mnist", "MNIST", "raw")
    side_by_side(*[lambda s=s: readme_smoke(s) for s in sorted(PARSERS)])  # the four runs, two at a time
    return data_dir


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_readme_smoke_command_runs(script, smoke_data, readme_smoke):
    """`python SCRIPT.py --smoke` exactly as the README writes it; the data root comes from $DATA_DIR (as a
    user's would), and only the output folder is moved out of the clone (the run other tests read as well)."""
    assert ["--smoke"] in [a for s, a, _ in readme_commands() if s == script]
    p, _ = readme_smoke(script)
    assert p.returncode == 0, f"python {script}.py --smoke failed:\n{p.stderr[-3000:]}"
    assert re.search(r"(?i)\beta\b", p.stdout), f"{script}: no ETA in its log lines:\n{p.stdout[-2000:]}"


def prose_lines():
    """README.md's lines, those inside ``` code blocks blanked (kept as '' so line numbers hold)."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    lines, fenced = [], False
    for l in text.splitlines():
        fenced ^= l.startswith("```")
        lines.append("" if fenced else l)
    return lines


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped (letters, digits, '_', '-' and spaces
    kept), each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_by_hand():
    assert github_anchor("rho-SIM: FLOPs of a step (its 16.5% claim)") == "rho-sim-flops-of-a-step-its-165-claim"
    assert github_anchor("A (arXiv 2509.18165, its 94.65 -> 94.94)") == "a-arxiv-250918165-its-9465---9494"
    assert github_anchor("IMDB's hidden-layer units ") == "imdbs-hidden-layer-units"


def test_readme_links_reach_their_sections_and_the_results_index_lists_every_one():
    """Every in-page link of the README lands on a heading (a renamed heading breaks its link), headings are
    unique (GitHub would number a repeat), and the index under the Results table names every results section."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    lines = prose_lines()  # a '# comment' inside a code block is no heading
    heads = [github_anchor(l.lstrip("#")) for l in lines if re.match(r"#{1,6} ", l)]
    assert len(heads) == len(set(heads)), "two README headings share an anchor"
    links = re.findall(r"\]\(#([^)\s]+)\)", text)
    assert links, "the README has no in-page links: the Results index is gone"
    assert sorted(set(links) - set(heads)) == [], "README links to headings that do not exist"
    start = lines.index("## Results")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    sections = [github_anchor(l[4:]) for l in lines[start:end] if l.startswith("### ")]
    assert len(sections) > 10
    assert [s for s in sections if s not in links] == [], "results sections missing from the index under the table"


def readme_tables():
    """[(first line number, [rows as lists of cells])] of every markdown table outside code blocks."""
    tables, cur = [], None
    for n, l in enumerate(prose_lines(), 1):
        if l.startswith("|"):
            if cur is None:
                cur = (n, [])
                tables.append(cur)
            cur[1].append([c.strip() for c in re.split(r"(?<!\\)\|", l.strip().strip("|"))])  # '\|' stays text
        else:
            cur = None
    return tables


def test_readme_tables_keep_their_columns_and_every_measured_result_names_its_device():
    """GitHub drops a row's extra cells and leaves missing ones blank without a word, so a stray ' | ' in a
    long Results cell would silently cut it short; and a measured result is only read with the device it
    ran on."""
    tables = readme_tables()
    assert len(tables) > 20
    for n, rows in tables:
        width = len(rows[0])
        assert all(re.fullmatch(r":?-{3,}:?", c) for c in rows[1]), f"README table at line {n}: no separator row"
        bad = [n + i for i, r in enumerate(rows) if len(r) != width]
        assert not bad, f"README lines {bad}: cell count differs from the header's {width}"
    results = next(rows for _, rows in tables if rows[0] == ["experiment", "paper", "ours", "device"])
    for exp, paper, ours, device in results[2:]:
        if ours.startswith("not yet measured"):
            assert device == "", f"Results row '{exp[:60]}': a device for a result not measured"
        else:
            assert re.match(r"(CPU|H100|H200)\b", device), f"Results row '{exp[:60]}': no device ({device!r})"
