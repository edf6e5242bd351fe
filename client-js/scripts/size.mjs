// Reports the SDK's size as a browser would load it: bundled, minified
// (esbuild) and gzip-compressed (zlib level 9). `npm run size`.
import { buildSync } from "esbuild";
import { gzipSync } from "node:zlib";
import { fileURLToPath } from "node:url";

const entry = fileURLToPath(new URL("../dist/index.js", import.meta.url));
const out = buildSync({ entryPoints: [entry], bundle: true, minify: true, format: "esm", write: false });
const min = out.outputFiles[0].contents;
const gz = gzipSync(min, { level: 9 });
console.log(`dist/index.js bundled + minified: ${min.length} B, + gzip: ${gz.length} B`);
const limit = Number(process.env.EG_SDK_SIZE_LIMIT ?? 8192);
if (gz.length > limit) {
  console.error(`over the ${limit} B budget`);
  process.exit(1);
}
