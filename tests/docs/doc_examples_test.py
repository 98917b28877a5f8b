#!/usr/bin/python3
"""Runs every shell and Python example of README.md and docs/ as written.

The examples run in order (README.md, then docs/**/*.md sorted), as
docs/examples.md describes: from the repository root of a build, with
build/bin on PATH, PYTHONPATH=build/python and kvrecalld serving on the
default address. Here the daemon is a fresh one on a temporary data
directory and a free port: its address replaces 127.0.0.1:7878 in the
examples and is in $KVRECALL_TARGET. The working directory is a temporary
directory that links every top-level entry of the source tree (and `build`
to the build tree), so files the examples write stay out of the checkout.

A fenced ```sh / ```bash / ```python block runs unless the line before its
fence is `<!-- example: skip (why) -->`. In a shell block written as a
session (commands after `$ `, their output below them) each command runs on
its own: it must exit 0, or 1 when its documented output starts with
`kvrecall: CODE:` (a documented error), and the first word of its first
documented output line must be a word of what it prints (numbers and hex
ids aside, which change from run to run). Variables a
command sets (`K=...`) carry to the next commands of the same file. Other
shell blocks run line by line the same way, without output checks.

Before running anything the docs are checked to stand alone: no reference
to notes outside the repository (peers.md, methods.md, STYLE.md,
ARCHITECTURE.md, ../shared) and no relative link to a missing file.

Exit status 0 when every example ran as written and the checks passed.
"""

import argparse
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

DEFAULT_ADDRESS = "127.0.0.1:7878"
SKIP_MARKER = re.compile(r"^<!--\s*example:\s*skip\s*\((?P<why>[^)]*\S[^)]*)\)\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*example:")
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
RUNNABLE = {"sh": "sh", "bash": "sh", "python": "python"}
# Notes that are not part of the repository, and the data directory beside it.
OUTSIDE_REFERENCES = re.compile(
    r"(?i:peers\.md|methods\.md|style-anchors\.md)|STYLE\.md|ARCHITECTURE\.md|\.\./shared|/work/shared")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTED_ERROR = re.compile(r"^kvrecall: [A-Z_]+: ")
COMMAND_TIMEOUT_S = 600


def shape(word):
    """A word with its numbers and hex ids (hashes, operation ids) as `#`."""
    return re.sub(r"[0-9a-f]{8,}|[0-9]+(\.[0-9]+)?", "#", word)


class Block:
    def __init__(self, path, line, lang, text, skip):
        self.path, self.line, self.lang, self.text, self.skip = path, line, lang, text, skip

    def where(self):
        return "%s:%d" % (self.path, self.line)


def doc_files(source):
    files = [os.path.join(source, "README.md")]
    files += sorted(glob.glob(os.path.join(source, "docs", "**", "*.md"), recursive=True))
    return files


def parse_blocks(path, source, problems):
    """The fenced blocks of a markdown file, with their skip markers."""
    rel = os.path.relpath(path, source)
    lines = open(path, encoding="utf-8").read().split("\n")
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if ANY_MARKER.search(lines[i]) and not SKIP_MARKER.match(lines[i].strip()):
                problems.append("%s:%d: malformed example marker (write `<!-- example: skip "
                                "(why) -->`): %s" % (rel, i + 1, lines[i].strip()))
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        text = "\n".join(lines[start + 1:j])
        previous = lines[start - 1].strip() if start > 0 else ""
        marker = SKIP_MARKER.match(previous)
        lang = m.group("lang")
        if marker and lang not in RUNNABLE:
            problems.append("%s:%d: a skip marker before a ```%s block (only sh and python blocks "
                            "run)" % (rel, start + 1, lang))
        if not lang and looks_like_shell(text):
            problems.append("%s:%d: a block of shell commands without a language: label it "
                            "```sh (and mark it skipped if it must not run)" % (rel, start + 1))
        blocks.append(Block(rel, start + 1, RUNNABLE.get(lang), text,
                            marker.group("why") if marker else None))
        i = j + 1
    return blocks


def looks_like_shell(text):
    first = next((l for l in text.split("\n") if l.strip()), "")
    return bool(re.match(r"^(\$ |build/bin/|\./deploy/|cmake |ninja |kvrecall |/usr/bin/python3 )",
                         first))


def check_standalone(source, files, problems):
    for path in files:
        rel = os.path.relpath(path, source)
        for n, line in enumerate(open(path, encoding="utf-8").read().split("\n"), 1):
            for m in OUTSIDE_REFERENCES.finditer(line):
                problems.append("%s:%d: refers to %r, which is not in the repository: say what "
                                "is needed here or cite the public paper" % (rel, n, m.group(0)))
            for m in MARKDOWN_LINK.finditer(line):
                target = m.group(1).split("#")[0]
                if not target or re.match(r"^[a-z]+:", target):
                    continue
                if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                    problems.append("%s:%d: link to a missing file: %s" % (rel, n, m.group(1)))


def complete(command):
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:
        return False
    return True


def parse_shell(text):
    """[(command, documented output lines)] of a shell block."""
    lines = text.split("\n")
    session = any(l.startswith("$ ") for l in lines)
    commands = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if session and not line.startswith("$ "):
            if commands:
                commands[-1][1].append(line)
            i += 1
            continue
        command = line[2:] if session else line
        i += 1
        while not complete(command) and i < len(lines):
            command += "\n" + lines[i]
            i += 1
        if command.strip() and not command.strip().startswith("#"):
            commands.append((command, []))
    return session, commands


class Runner:
    def __init__(self, source, build, work, env):
        self.source, self.build, self.work, self.env = source, build, work, env
        self.failures = []
        self.ran = 0

    def fail(self, block, what, output=""):
        tail = "\n".join(output.rstrip().split("\n")[-25:])
        self.failures.append("%s: %s%s" % (block.where(), what,
                                           ("\n    " + tail.replace("\n", "\n    ")) if tail else ""))

    def shell(self, block, env, command, documented, session):
        state = os.path.join(self.work, ".example-env")
        script = "set -a\nset -o pipefail\n%s\n__rc=$?\nenv -0 > %s\nexit $__rc\n" % (
            command, shlex.quote(state))
        started = time.time()
        try:
            done = subprocess.run(["bash", "-c", script], cwd=self.work, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.fail(block, "timed out after %d s: %s" % (COMMAND_TIMEOUT_S, command))
            return env
        self.ran += 1
        output = done.stdout.decode("utf-8", "replace")
        print("  $ %s  (exit %d, %.1f s)" % (command.replace("\n", "\n    "), done.returncode,
                                           time.time() - started), flush=True)
        shown = [l for l in documented if l.strip() and l.strip() != "..."]
        expect_error = bool(shown) and DOCUMENTED_ERROR.match(shown[0].strip()) is not None
        # 141: SIGPIPE, a producer cut off by `| head` after it wrote.
        ok_codes = (1,) if expect_error else (0, 141)
        if done.returncode not in ok_codes:
            self.fail(block, "exit %d (expected %s): %s" % (
                done.returncode, " or ".join(map(str, ok_codes)), command), output)
        elif session and shown:
            word = shown[0].split()[0]
            printed = {shape(w) for w in output.split()}
            if shape(word) not in printed:
                self.fail(block, "documented output starts with %r, but the command printed no "
                          "such word: %s" % (word, command), output)
        if os.path.exists(state):
            raw = open(state, "rb").read().decode("utf-8", "replace")
            os.unlink(state)
            carried = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
            carried.pop("__rc", None)
            carried.pop("SHLVL", None)
            carried.pop("_", None)
            carried.pop("PWD", None)
            carried.pop("OLDPWD", None)
            return carried
        return env

    def python(self, block, env):
        path = os.path.join(self.work, ".example-%d.py" % self.ran)
        with open(path, "w", encoding="utf-8") as f:
            f.write(block.text + "\n")
        started = time.time()
        try:
            done = subprocess.run(["/usr/bin/python3", path], cwd=self.work, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.fail(block, "python example timed out after %d s" % COMMAND_TIMEOUT_S)
            return
        self.ran += 1
        print("  python example (exit %d, %.1f s)" % (done.returncode, time.time() - started),
              flush=True)
        if done.returncode != 0:
            self.fail(block, "python example exited %d" % done.returncode,
                      done.stdout.decode("utf-8", "replace"))

    def run_file(self, blocks, address):
        env = dict(self.env)  # variables carry within a file only
        for block in blocks:
            if block.lang is None:
                continue
            if block.skip is not None:
                print("%s: skipped (%s)" % (block.where(), block.skip), flush=True)
                continue
            print("%s: %s example" % (block.where(), block.lang), flush=True)
            block.text = block.text.replace(DEFAULT_ADDRESS, address)
            if block.lang == "python":
                self.python(block, env)
                continue
            session, commands = parse_shell(block.text)
            for command, documented in commands:
                env = self.shell(block, env, command, documented, session)


def start_daemon(build, work):
    data = os.path.join(work, ".kvrecalld")
    os.makedirs(data)
    port_file = os.path.join(data, "port")
    log = open(os.path.join(data, "kvrecalld.log"), "wb")
    daemon = subprocess.Popen(
        [os.path.join(build, "bin", "kvrecalld"), "--listen=127.0.0.1:0",
         "--port_file=" + port_file, "--data_dir=" + os.path.join(data, "data")],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError("kvrecalld exited %d; see %s" % (daemon.returncode, log.name))
        if os.path.exists(port_file):
            text = open(port_file).read().strip()
            if text.isdigit():
                return daemon, "127.0.0.1:" + text, log.name
        time.sleep(0.05)
    daemon.kill()
    raise RuntimeError("kvrecalld wrote no port file in 60 s; see %s" % log.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, help="repository root")
    ap.add_argument("--build", required=True, help="build tree (kvrecalld, kvrecall, python)")
    ap.add_argument("--check_only", action="store_true", help="the checks, no examples")
    args = ap.parse_args()
    source, build = os.path.abspath(args.source), os.path.abspath(args.build)

    problems = []
    files = doc_files(source)
    check_standalone(source, files, problems)
    blocks = {path: parse_blocks(path, source, problems) for path in files}
    if problems:
        print("docs checks failed:\n  " + "\n  ".join(problems))
        return 1
    if args.check_only:
        print("docs checks passed (%d files)" % len(files))
        return 0

    work = tempfile.mkdtemp(prefix="kvrecall-doc-examples-")
    for entry in os.listdir(source):
        if entry in ("build", "data") or entry.startswith("."):
            continue
        os.symlink(os.path.join(source, entry), os.path.join(work, entry))
    os.symlink(build, os.path.join(work, "build"))
    env = dict(os.environ)
    shared = env.get("KVRECALL_SHARED_DIR") or os.path.join(source, "..", "shared")
    env["KVRECALL_SHARED_DIR"] = os.path.abspath(shared)
    env["PATH"] = os.path.join(build, "bin") + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.path.join(build, "python")
    env["KVRECALL_WORKER_LIB"] = os.path.join(build, "lib", "libkvrecall_worker.so")
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    daemon, address, log = start_daemon(build, work)
    env["KVRECALL_TARGET"] = address
    print("kvrecalld on %s (log %s); examples run in %s" % (address, log, work), flush=True)
    runner = Runner(source, build, work, env)
    try:
        for path in files:
            runner.run_file(blocks[path], address)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
    if daemon.returncode not in (0, -signal.SIGTERM):
        runner.failures.append("kvrecalld exited %d at the end; see %s" % (daemon.returncode, log))
    if runner.failures:
        print("\n%d example command(s) failed:\n" % len(runner.failures))
        print("\n\n".join(runner.failures))
        print("\nkvrecalld log: %s" % log)
        return 1
    print("\nall %d example commands ran as written" % runner.ran)
    return 0


if __name__ == "__main__":
    sys.exit(main())
