// Regenerates the protobuf code into a temporary folder and fails if it differs from src/gen
// (run `npm run gen` after changing proto/bimip/v1/*.proto and commit the result).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const tmp = mkdtempSync(join(tmpdir(), "bimip-gen-"));

function files(dir) {
  let out = [];
  let names = [];
  try {
    names = readdirSync(dir);
  } catch {
    return out;
  }
  for (const n of names) {
    const p = join(dir, n);
    out = statSync(p).isDirectory() ? out.concat(files(p)) : out.concat([p]);
  }
  return out;
}

try {
  const buf = join(root, "node_modules", ".bin", "buf");
  execFileSync(
    buf,
    ["generate", "../../proto", "--path", "../../proto/bimip/v1", "--template", "buf.gen.yaml", "--output", tmp],
    { cwd: root, stdio: "inherit", env: { ...process.env, PATH: join(root, "node_modules", ".bin") + delimiter + process.env.PATH } },
  );
  const want = join(tmp, "src", "gen");
  const have = join(root, "src", "gen");
  const a = files(want).map((f) => relative(want, f)).sort();
  const b = files(have).map((f) => relative(have, f)).sort();
  const problems = [];
  for (const f of new Set([...a, ...b])) {
    if (!a.includes(f)) problems.push(`src/gen/${f}: not generated any more (delete it)`);
    else if (!b.includes(f)) problems.push(`src/gen/${f}: missing`);
    else if (!readFileSync(join(want, f)).equals(readFileSync(join(have, f)))) problems.push(`src/gen/${f}: differs`);
  }
  if (problems.length > 0) {
    console.error("generated code is out of date; run `npm run gen` in clients/js and commit:\n  " + problems.join("\n  "));
    process.exitCode = 1;
  } else {
    console.log(`src/gen is up to date (${a.length} file(s))`);
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
