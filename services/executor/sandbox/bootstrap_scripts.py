"""The first thing a warm JavaScript or Bash sandbox runs: the same protocol as bootstrap_python.py
(say "R" on fd 5, read one payload from fd 4 until EOF, close it, then become the program), or,
under gVisor, the payload first on stdin framed as b"<length>\n"."""

# node -e <this>. The payload is JSON: {workdir, main, code, env, files: {name: base64}}.
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
  let payload;
  if (process.argv[1] === 'stdin') {
    const readExactly = (size) => {
      const data = Buffer.alloc(size);
      for (let got = 0; got < size; ) {
        const count = fs.readSync(0, data, got, size - got, null);
        if (count === 0) process.exit(70);
        got += count;
      }
      return data;
    };
    let header = '';
    while (!header.endsWith('\n')) header += readExactly(1).toString();
    payload = JSON.parse(readExactly(Number(header)).toString('utf8'));
  } else {
    fs.writeSync(5, 'R');
    fs.closeSync(5);
    const chunks = [];
    const buffer = Buffer.allocUnsafe(1 << 20);
    for (;;) {
      const count = fs.readSync(4, buffer, 0, buffer.length, null);
      if (count === 0) break;
      chunks.push(Buffer.from(buffer.subarray(0, count)));
    }
    fs.closeSync(4);
    payload = JSON.parse(Buffer.concat(chunks).toString('utf8'));
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

# bash -c <this>. The payload is a script written by the backend (see runtimes.bash_payload): it
# closes fd 4, writes the files and the code, and execs a fresh bash on the code with the run's
# environment only. `.` reads a pipe to its end before running any of it.
BASH_BOOTSTRAP = "printf R >&5; exec 5>&-; . /dev/fd/4"
# `read -N` takes exactly that many characters (the payload script is ASCII), leaving the rest of
# stdin to the program.
BASH_BOOTSTRAP_STDIN = 'IFS= read -r size && IFS= read -r -N "$size" script && eval "$script"'
