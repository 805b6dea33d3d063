#!/usr/bin/env bash
# Prepares, on a developer's machine, what benchmarks/gpu_check.sh needs on the lent GPU
# machine, which has no network and only the repository (not ../shared):
#   .whl/       wheels (CPython 3.12, manylinux x86_64) of the packages cxr imports that the
#               GPU machine's Python lacks, and of their own missing requirements;
#   .gpu-data/  a few real NIH PNGs, their rows of the NIH table, and the real (JPEG
#               compressed) DICOM, copied from ../shared/data.
# Both are ignored by git (.git/info/exclude) and travel with the device call's `carry`.
# The versions are those installed in the Python that runs this script (the project's
# venv), so the GPU machine runs the versions cxr was tested with here.
#
#   . .venv/bin/activate && bash benchmarks/gpu_prepare.sh
#
# Run again at any time: wheels already there are kept, stale ones removed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SHARED=${CXR_SHARED_DATA:-../shared/data}
# The device tool takes at most 64 MiB (the tree, the wheels and the images together); stop
# well before, so that the tree can grow without the check failing to start.
LIMIT_MIB=${GPU_CARRY_LIMIT_MIB:-48}
IMAGES=16  # NIH PNGs (~400 KB each): the throughput benchmark repeats them to fill batches

"$PYTHON" -c 'import cxr, packaging' 2>/dev/null || {
  echo "gpu_prepare.sh: run it with the project's venv active (cxr and its dependencies)" >&2
  exit 2
}

# ---------------------------------------------------------------------------- 1. wheels
mkdir -p .whl
# The package list is computed in Python: cxr's dependencies (pyproject.toml) that the GPU
# machine lacks, then each wheel's own Requires-Dist (extras skipped, markers evaluated for
# CPython 3.12 on Linux x86_64) until nothing new is missing. Each wheel is fetched with
# `pip download --no-deps` and the exact platform flags the device tool documents.
"$PYTHON" - <<'PY'
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# What the GPU machine's python3 (3.12, /opt/torch/.venv) already has, as its documentation
# lists it. Anything else cxr needs travels as a wheel.
ON_GPU_MACHINE = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohttp anyio attrs certifi click cloudpickle contourpy cycler
filelock fonttools fsspec h11 h5py httpcore httpx idna imageio jinja2 joblib kiwisolver
markdown markupsafe matplotlib numpy onnx onnxruntime packaging pandas pillow pluggy
prometheus-client protobuf psutil pyarrow pygments pyparsing pytest pytest-xdist
python-dateutil pyyaml rich safetensors scikit-learn scipy six tensorboard threadpoolctl
torch torchvision tqdm typer typing-extensions
""".split()))
# There, but possibly older than the carried packages need: pydantic and pydantic-core ask
# for typing-extensions >= 4.16, which the machine's version is not known to meet. Newer
# typing-extensions keeps the older API, so shadowing the machine's copy is safe for torch.
ALWAYS = {canonicalize_name("typing-extensions")}
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
BASE = [
    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
    "--python-version", "3.12", "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
    "--platform", "manylinux1_x86_64", "-d", ".whl",
]
# pip matches a manylinux_2_N tag only if N is named; some wheels exist for newer glibc only
# (pylibjpeg-libjpeg 2.5: manylinux_2_31). The GPU machine's glibc is printed by the check.
NEWER = [arg for n in range(29, 40) for arg in ("--platform", f"manylinux_2_{n}_x86_64")]
WHEELS = Path(".whl")


def needed(requirements) -> list[Requirement]:
    out = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET):
            continue  # an extra, or another Python / platform
        out.append(requirement)
    return out


def wheel_of(name: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = [p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(stem + "-")]
    return found[0] if len(found) == 1 else None


def fetch(name: str, version: str) -> Path:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for old in WHEELS.glob("*.whl"):  # one version of each: two stop the whole install
        if old.name.lower().startswith(stem + "-") and old.name.split("-")[1] != version:
            old.unlink()
    have = wheel_of(name)
    if have is not None:
        return have
    spec = f"{name}=={version}"
    if subprocess.run([*BASE, spec], check=False).returncode != 0:
        print(f"gpu_prepare.sh: no manylinux_2_28-or-older wheel of {spec}; "
              "trying newer manylinux tags", flush=True)
        if subprocess.run([*BASE, *NEWER, spec], check=False).returncode != 0:
            sys.exit(f"gpu_prepare.sh: FAILED to download a cp312 manylinux wheel of {spec}")
    have = wheel_of(name)
    if have is None:
        sys.exit(f"gpu_prepare.sh: {spec} downloaded, but no single wheel of it in .whl/")
    return have


project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
queue = [r.name for r in needed(project["dependencies"])]
queue += sorted(ALWAYS)
chosen: dict[str, tuple[str, Path]] = {}
while queue:
    name = canonicalize_name(queue.pop(0))
    if name in chosen or (name in ON_GPU_MACHINE and name not in ALWAYS):
        continue
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"gpu_prepare.sh: {name} is needed but not installed here (pip install it)")
    wheel = fetch(name, version)
    chosen[name] = (version, wheel)
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(archive.read(meta).decode()).get_all("Requires-Dist") or []
    queue += [r.name for r in needed(requires)]

keep = {wheel.name for _, wheel in chosen.values()}
for stale in WHEELS.glob("*.whl"):
    if stale.name not in keep:
        stale.unlink()
lines = [f"{name}=={version}  {wheel.name}" for name, (version, wheel) in sorted(chosen.items())]
(WHEELS / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
print("wheels for the GPU machine (.whl/):")
print("\n".join("  " + line for line in lines))
PY

# ---------------------------------------------------------------------------- 2. images
[ -d "$SHARED/nih/images" ] || {
  echo "gpu_prepare.sh: no $SHARED/nih/images (set CXR_SHARED_DATA)" >&2
  exit 2
}
rm -rf .gpu-data
mkdir -p .gpu-data/nih/images .gpu-data/misc
# The first images of NIH's table that are on disk, in its order; copied writable (the shared
# files are read-only, which would stop the next run from replacing them).
"$PYTHON" - "$SHARED/nih" "$IMAGES" <<'PY'
import csv
import shutil
import sys
from pathlib import Path

source, count = Path(sys.argv[1]), int(sys.argv[2])
with open(source / "images.csv", newline="") as handle:
    reader = csv.reader(handle)
    header = next(reader)
    rows = [row for row in reader if (source / "images" / row[0]).is_file()][:count]
with open(".gpu-data/nih/images.csv", "w", newline="") as handle:
    csv.writer(handle, lineterminator="\n").writerows([header, *rows])
for row in rows:
    shutil.copyfile(source / "images" / row[0], Path(".gpu-data/nih/images") / row[0])
print(f"copied {len(rows)} NIH PNGs and their rows of images.csv to .gpu-data/nih/")
PY
for dicom in "$SHARED"/misc/*.dcm; do
  cp --no-preserve=mode "$dicom" .gpu-data/misc/
done
cat >.gpu-data/README.txt <<EOF
Copied from $SHARED by benchmarks/gpu_prepare.sh for benchmarks/gpu_check.sh on a GPU
machine (real NIH ChestX-ray14 data; see ../shared/data/README.md for origin and terms).
Not part of the repository: ignored through .git/info/exclude.
EOF

# ---------------------------------------------------------------------------- 3. ignored
# .git/info/exclude, not .gitignore: these are one developer's local copies. In a worktree
# `git rev-parse --git-path` names the shared exclude file.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for entry in /.whl/ /.gpu-data/; do
  grep -qxF "$entry" "$exclude" 2>/dev/null || echo "$entry" >>"$exclude"
done
for folder in .whl .gpu-data; do
  git check-ignore -q "$folder" || {
    echo "gpu_prepare.sh: $folder is not ignored by git; it must never be committed" >&2
    exit 1
  }
done

# ---------------------------------------------------------------------------- 4. size
# What the device call sends: the tracked and untracked-but-not-ignored files, plus the two
# carried folders.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
  xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
whl_bytes=$(du -sb .whl | cut -f1)
data_bytes=$(du -sb .gpu-data | cut -f1)
total=$((tree_bytes + whl_bytes + data_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "to carry: tree $(mib "$tree_bytes") + .whl $(mib "$whl_bytes") + .gpu-data" \
  "$(mib "$data_bytes") = $(mib "$total") (device tool limit 64 MiB; this check's $LIMIT_MIB MiB)"
if ((total > LIMIT_MIB * 1048576)); then
  echo "gpu_prepare.sh: FAILED: $(mib "$total") is over $LIMIT_MIB MiB" >&2
  exit 1
fi
