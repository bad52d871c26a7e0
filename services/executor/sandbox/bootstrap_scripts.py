"""The first thing a warm JavaScript or Bash sandbox runs: the same protocol as bootstrap_python.py
(say "R" on fd 5, read one payload frame, b"<length>\n" + body, from fd 4, close it, then become
the program), or, under gVisor, "R" on stdout and the frame first on stdin."""

# node -e <this>. The payload is the JSON object of runtimes.py:
# {workdir, main, code, env, files: {name: base64}, end_token?}.
NODE_BOOTSTRAP = r"""
'use strict';
(() => {
  const fs = require('fs');
  const path = require('path');
  // Warm what the first run would otherwise pay for: the stdio streams and the module loader.
  void process.stdout, process.stderr;
  const warm = path.join('/tmp', `.warm-up-${process.pid}.js`);
  fs.writeFileSync(warm, 'module.exports = [1, 2, 3].map(String).join();');
  require(warm);
  delete require.cache[warm];
  fs.unlinkSync(warm);
  const stdinMode = process.argv[1] === 'stdin';
  const source = stdinMode ? 0 : 4;
  const readExactly = (size) => {
    const data = Buffer.alloc(size);
    for (let got = 0; got < size; ) {
      const count = fs.readSync(source, data, got, size - got, null);
      if (count === 0) process.exit(70);
      got += count;
    }
    return data;
  };
  if (stdinMode) {
    fs.writeSync(1, 'R');
  } else {
    fs.writeSync(5, 'R');
    fs.closeSync(5);
  }
  let header = '';
  while (!header.endsWith('\n')) header += readExactly(1).toString();
  const payload = JSON.parse(readExactly(Number(header)).toString('utf8'));
  if (!stdinMode) fs.closeSync(4);
  if (payload.end_token !== undefined) {
    // Node prints an uncaught exception after 'exit': then no marker, and the backend waits for
    // the sandbox to end instead.
    const token = payload.end_token;
    let fatal = false;
    process.on('uncaughtExceptionMonitor', () => { fatal = true; });
    process.on('exit', (code) => { if (!fatal) fs.writeSync(2, `\0pythonon-exit ${token} ${code}\n`); });
  }
  for (const name of Object.keys(process.env)) delete process.env[name];
  Object.assign(process.env, payload.env);
  process.chdir(payload.workdir);
  for (const [name, content] of Object.entries(payload.files)) {
    const target = path.join(payload.workdir, name);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, Buffer.from(content, 'base64'));
  }
  const main = path.join(payload.workdir, payload.main);
  fs.writeFileSync(main, payload.code);
  process.argv.splice(1, process.argv.length - 1, main);
  require('module').runMain();
})();
"""

# bash -c <this>. The payload is a script written by the backend (see runtimes._bash_payload): it
# closes fd 4, writes the files and the code, and runs a fresh bash on the code with the run's
# environment only. Under bwrap the frame is the pipe's only content: after its length, `.` reads
# the rest to its end before running any of it. Under gVisor, `read -N` takes exactly that many
# characters (the payload script is ASCII), leaving the rest of stdin to the program.
BASH_BOOTSTRAP = "printf R >&5; exec 5>&-; IFS= read -r size <&4 && . /dev/fd/4"
BASH_BOOTSTRAP_STDIN = 'printf R; IFS= read -r size && IFS= read -r -N "$size" script && eval "$script"'
