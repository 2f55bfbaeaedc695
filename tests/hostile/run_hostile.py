#!/usr/bin/env python3
"""Runs Kiln's hostile-input corpus (gen_hostile.py) through the `kiln` CLI.

usage: run_hostile.py KILN WORKDIR [--timeout S] [--max-rss-mib N] [--jobs N] [--json FILE]

Every case must: exit with one of its allowed codes (never a signal, never a sanitizer report),
finish within the timeout (never a hang), print a one-line `error: ...` message (matching the
case's regex where it has one) when it fails, and never grow past --max-rss-mib of resident
memory (`kiln --maxMemory 256` is passed to every case that loads a model).
Exit status: 0 when every case passed, 1 otherwise.
"""
import argparse
import concurrent.futures
import json
import os
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_hostile  # noqa: E402

SANITIZER = re.compile(r"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:|"
                       r"ThreadSanitizer|terminate called|Segmentation fault|Aborted")


def run_case(kiln, case, timeout, max_rss_mib):
    t0 = time.monotonic()
    try:
        p = subprocess.Popen([kiln] + case["args"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        return dict(case, ok=False, why="cannot start kiln: %s" % e)
    try:
        out, err = p.communicate(timeout=timeout)
        rss_kib = 0
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return dict(case, ok=False, why="hang: still running after %ss" % timeout, secs=timeout)
    secs = time.monotonic() - t0
    rc = p.returncode
    err_s = err.decode("utf-8", "replace")
    why = None
    if rc < 0:
        why = "killed by signal %d" % -rc
    elif SANITIZER.search(err_s):
        why = "sanitizer / abort report"
    elif rc not in case["rc"]:
        why = "exit code %d, expected %s" % (rc, "/".join(map(str, case["rc"])))
    elif rc != 0:
        lines = [l for l in err_s.splitlines() if l.startswith("error:") or l.startswith("kiln ")]
        if not lines:
            why = "exit %d without an `error:` message" % rc
        elif case.get("expect") and not re.search(case["expect"], err_s):
            why = "message does not match /%s/" % case["expect"]
        elif any(len(l) > 4000 for l in lines):
            why = "error message longer than 4000 characters"
    return dict(case, ok=why is None, why=why, rc=rc, secs=round(secs, 3),
                stderr=err_s[-600:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("workdir")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("KILN_HOSTILE_TIMEOUT", 60)))
    ap.add_argument("--max-rss-mib", type=int, default=2048)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--filter", default="")
    a = ap.parse_args()
    kiln = os.path.abspath(a.kiln)
    d = os.path.abspath(a.workdir)
    t0 = time.monotonic()
    cases = gen_hostile.cases(d)
    setup = [c for c in cases if c["category"] == "setup"]
    cases = [c for c in cases if c["category"] != "setup"]
    for c in setup:
        r = run_case(kiln, c, a.timeout, a.max_rss_mib)
        if not r["ok"]:
            print("hostile: setup step %s failed: %s\n%s" % (c["name"], r["why"], r.get("stderr", "")))
            return 1
    cases += gen_hostile.plan_case_list(d)
    if a.filter:
        cases = [c for c in cases if re.search(a.filter, c["name"])]

    def limited(c):
        return run_case(kiln, c, a.timeout, a.max_rss_mib)

    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as ex:
        for r in ex.map(limited, cases):
            results.append(r)
    # RLIMIT_AS would break ASan's shadow mapping, so memory is checked after the fact: the
    # largest resident set any child reached.
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    failed = [r for r in results if not r["ok"]]
    if peak_mib > a.max_rss_mib:
        failed.append(dict(name="peak-rss", category="allocation", ok=False, args=[],
                           why="a case reached %d MiB resident (limit %d)" % (peak_mib, a.max_rss_mib)))
    by_cat = {}
    for r in results:
        s = by_cat.setdefault(r["category"], [0, 0])
        s[0] += 1
        s[1] += r["ok"]
    for r in failed:
        print("FAIL %-40s %s\n     kiln %s\n     %s" % (r["name"], r["why"], " ".join(r["args"]),
                                                      r.get("stderr", "").strip().replace("\n", "\n     ")))
    for cat, (n, ok) in sorted(by_cat.items()):
        print("  %-16s %4d cases, %4d passed" % (cat, n, ok))
    slowest = max(results, key=lambda r: r.get("secs", 0))
    print("hostile: %d cases, %d passed, %d failed in %.1fs (slowest %s %.2fs, peak RSS %d MiB)" %
          (len(results), len(results) - len(failed), len(failed), time.monotonic() - t0,
           slowest["name"], slowest.get("secs", 0), peak_mib))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cases=len(results), passed=len(results) - len(failed),
                           by_category=by_cat, failed=[r["name"] for r in failed]), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
