# Sourced by benchmarks/gpu_lease.sh, with $root (the checkout) and $out (a log folder) set:
# makes python3 import mixtail from this checkout (as it is if it already does, else an editable install, else
# symlinks outside the root, which the root's own mixtail/ would shadow) and cds to where it then imports.
rundir=$root
if python3 -c "import sys, mixtail.pipelines as p; sys.exit(p.__file__.startswith('$root/') is False)" 2>/dev/null; then
  :
elif ! python3 -m pip install --no-deps --no-build-isolation -e . -q >"$out/pip.log" 2>&1; then
  echo "editable install failed (see pip.log): importing through symlinks"
  rundir=$(mktemp -d)
  mkdir "$rundir/mixtail"
  for f in "$root"/mixtail/*.py; do ln -s "$f" "$rundir/mixtail/"; done
  for d in pipelines kernels trainer benchmarks configs; do ln -s "$root/$d" "$rundir/mixtail/$d"; done
  export PYTHONPATH="$rundir${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$rundir" || exit 1
