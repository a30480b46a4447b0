"""Recover's host memory plan against the measured peak resident set (issue 26).

  python -m benchmarks.host_memory --root=/tmp/host_memory --ipcs=10,1000

Trains the smoke config's teacher once (`--stages=squeeze`), then for each IPC runs
`--stages=recover --config.recover.ipc=N` in a fresh process (one device, the smoke config)
and compares the host plan recover wrote to `recover/plan.json` (`recover.host_plan`) with
the process's peak resident set (`VmHWM`, read as it exits). Prints one row per IPC and writes
`<root>/host_memory.json`.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'fashion_mnist_ipc10.py') + ':smoke'
# Runs the command line as `python -m sre2l_jax.main` would and prints VmHWM when it exits.
CHILD = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "  for line in open('/proc/self/status'):\n"
         "    if line.startswith('VmHWM:'):\n"
         "      print('PEAK_RSS_KIB', line.split()[1], file=sys.stderr, flush=True)\n"
         "atexit.register(peak)\n"
         "sys.argv = ['sre2l_jax.main'] + sys.argv[1:]\n"
         "runpy.run_module('sre2l_jax.main', run_name='__main__')\n")


def run(args: list[str]) -> tuple[int, float]:
  """(peak resident set in bytes, wall seconds) of one main invocation."""
  start = time.time()
  out = subprocess.run([sys.executable, '-c', CHILD] + args, cwd=REPO, capture_output=True,
                       text=True, check=False)
  if out.returncode:
    sys.exit(f'failed ({out.returncode}): {" ".join(args)}\n{out.stderr[-3000:]}')
  kib = [int(l.split()[1]) for l in out.stderr.splitlines() if l.startswith('PEAK_RSS_KIB')]
  return kib[-1] * 1024, time.time() - start


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--root', required=True)
  p.add_argument('--ipcs', default='10,1000')
  args = p.parse_args(argv)
  teacher_work = os.path.join(args.root, 'teacher')
  if not os.path.exists(os.path.join(teacher_work, 'squeeze', 'result.json')):
    run([f'--config={CONFIG}', f'--workdir={teacher_work}', '--stages=squeeze'])
  rows = []
  for ipc in [int(x) for x in args.ipcs.split(',')]:
    workdir = os.path.join(args.root, f'ipc{ipc}')
    peak, wall = run([f'--config={CONFIG}', f'--workdir={workdir}', '--stages=recover',
                      f'--config.squeeze.teacher_dir={teacher_work}/squeeze/teacher',
                      f'--config.recover.ipc={ipc}', '--overwrite'])
    with open(os.path.join(workdir, 'recover', 'plan.json')) as f:
      plan = json.load(f)
    host = plan['host']
    rows.append({'ipc': ipc, 'peak_rss_bytes': peak, 'host_plan': host,
                 'device_plan_bytes': plan['peak_bytes'], 'plan_over_measured':
                 host['peak_bytes'] / peak, 'wall_seconds': wall})
    mib = lambda b: b / 2**20
    print(f'ipc {ipc}: peak RSS {mib(peak):.0f} MiB; host plan {mib(host["peak_bytes"]):.0f} '
          f'MiB (process at planning {mib(host["process_bytes"]):.0f} + devices '
          f'{mib(host["device_bytes"]):.0f} + passes '
          f'{mib(sum(host["passes"].values())):.0f}) = {100 * host["peak_bytes"] / peak:.0f}% '
          f'of measured; device plan {mib(plan["peak_bytes"]):.1f} MiB; {wall:.0f} s',
          flush=True)
  with open(os.path.join(args.root, 'host_memory.json'), 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
