#!/bin/sh
# Start a notebook from one of the templates lab-templates installs.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
templates="${CONDA_PREFIX:-$here}/share/lab-templates"
[ -d "$templates" ] || templates="$here/share/lab-templates"

usage() { echo "usage: new-notebook list | new-notebook <template> <file.ipynb>" >&2; exit 2; }

[ $# -ge 1 ] || usage
if [ "$1" = list ]; then
    for t in "$templates"/*.ipynb; do basename "$t" .ipynb; done
    exit 0
fi
[ $# -eq 2 ] || usage
source="$templates/$1.ipynb"
[ -f "$source" ] || { echo "new-notebook: no template '$1' (try: new-notebook list)" >&2; exit 1; }
[ ! -e "$2" ] || { echo "new-notebook: $2 exists; not overwriting it" >&2; exit 1; }
cp "$source" "$2"
echo "created $2 from template $1"
