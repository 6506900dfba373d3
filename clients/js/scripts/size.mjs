// Size of the package as an app bundles it: esbuild, one minified ESM file, gzip -9.
// Two numbers: the whole package, and an app that never uses `format: "json"` (the JSON codec,
// imported dynamically, replaced by a stub: what a bundler with cross-chunk tree shaking can drop).
import { build } from "esbuild";
import { gzipSync } from "node:zlib";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));

async function measure(label, plugins) {
  const r = await build({
    entryPoints: [root + "src/index.ts"],
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2020",
    write: false,
    logLevel: "error",
    plugins,
  });
  const bytes = r.outputFiles[0].contents;
  const gz = gzipSync(bytes, { level: 9 }).length;
  console.log(`${label}: ${(bytes.length / 1024).toFixed(1)} KiB minified, ${(gz / 1024).toFixed(1)} KiB gzip`);
}

const noJson = {
  name: "no-json",
  setup(b) {
    b.onResolve({ filter: /codec-json\.js$/ }, () => ({ path: "codec-json-stub", namespace: "stub" }));
    b.onLoad({ filter: /.*/, namespace: "stub" }, () => ({ contents: "export const jsonCodec = undefined;", loader: "js" }));
  },
};

await measure("bimip-client (binary + JSON)", []);
await measure("bimip-client (binary only)", [noJson]);
