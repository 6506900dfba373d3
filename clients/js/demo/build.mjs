// Builds the demo into crates/bimip-server/web/dist (embedded in the server binary):
// index.html plus assets/app-[hash].js and assets/app-[hash].css, minified, no source maps.
// `node demo/build.mjs --check` builds in memory and fails if the committed files differ.
import * as esbuild from "esbuild";
import { mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = resolve(here, "../../../crates/bimip-server/web/dist");
const check = process.argv.includes("--check");

const result = await esbuild.build({
  entryPoints: { app: join(here, "src/main.tsx") },
  bundle: true,
  format: "esm",
  target: "es2020",
  minify: true,
  jsx: "automatic",
  jsxImportSource: "preact",
  entryNames: "assets/[name]-[hash]",
  outdir: dist,
  write: false,
  legalComments: "none",
  charset: "utf8",
  logLevel: "warning",
});

/** relative path (with /) -> contents */
const files = new Map();
for (const f of result.outputFiles) files.set(relative(dist, f.path).split("\\").join("/"), f.contents);
const js = [...files.keys()].find((p) => p.endsWith(".js"));
const css = [...files.keys()].find((p) => p.endsWith(".css"));
if (!js || !css) throw new Error(`expected one .js and one .css output, got ${[...files.keys()]}`);
const html = (await readFile(join(here, "index.html"), "utf8")).replace("%APP_JS%", js).replace("%APP_CSS%", css);
files.set("index.html", new TextEncoder().encode(html));

async function listFiles(dir, base = dir) {
  const out = [];
  let entries = [];
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await listFiles(p, base)));
    else out.push(relative(base, p).split("\\").join("/"));
  }
  return out;
}

if (check) {
  const problems = [];
  const onDisk = await listFiles(dist);
  for (const p of onDisk) if (!files.has(p)) problems.push(`unexpected file: ${p}`);
  for (const [p, want] of files) {
    let have;
    try {
      have = await readFile(join(dist, p));
    } catch {
      problems.push(`missing: ${p}`);
      continue;
    }
    if (Buffer.compare(have, Buffer.from(want)) !== 0) problems.push(`differs: ${p}`);
  }
  if (problems.length) {
    console.error(`demo dist is out of date (run \`npm run demo:build\` in clients/js):\n  ${problems.join("\n  ")}`);
    process.exit(1);
  }
  console.log(`demo dist up to date (${files.size} files)`);
} else {
  await rm(dist, { recursive: true, force: true });
  for (const [p, data] of files) {
    await mkdir(dirname(join(dist, p)), { recursive: true });
    await writeFile(join(dist, p), data);
  }
  for (const [p, data] of files) console.log(`${p}  ${data.length} bytes`);
}
