// The golden frames in testdata/frames (one frame per file, in the server's canonical JSON) decode
// with this package's JSON codec, encode back to the same JSON value, and survive a binary round trip.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { equals } from "@bufbuild/protobuf";
import { binaryCodec, jsonCodec, FrameSchema } from "../dist/proto.js";

const here = fileURLToPath(new URL(".", import.meta.url));
const dir = process.env.BIMIP_FRAMES_DIR ? resolve(process.env.BIMIP_FRAMES_DIR) : join(here, "..", "..", "..", "testdata", "frames");
const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith(".json")).sort() : [];

if (files.length === 0) {
  test("golden frames", { skip: `no golden frames at ${dir} (testdata/frames/*.json); set BIMIP_FRAMES_DIR to use another folder` }, () => {});
} else {
  test(`golden frames: ${files.length} files in ${dir}`, async (t) => {
    for (const name of files) {
      await t.test(name, () => {
        const text = readFileSync(join(dir, name), "utf8").trim();
        const frame = jsonCodec.decode(text);
        assert.notEqual(frame.body.case, undefined, "the frame has a body");
        const again = jsonCodec.encode(frame);
        assert.deepEqual(JSON.parse(again), JSON.parse(text), "JSON → Frame → JSON keeps the value");
        const bin = binaryCodec.decode(binaryCodec.encode(frame));
        assert.ok(equals(FrameSchema, bin, frame), "binary round trip");
        assert.deepEqual(JSON.parse(jsonCodec.encode(bin)), JSON.parse(text));
      });
    }
  });
}
