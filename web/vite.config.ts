// Builds the dashboard into web/dist; the aggregator serves dist/index.html at / and
// dist/assets/* at /assets/ (aggregator/webui.py). Every asset is local: no CDN at run time.
import { defineConfig } from "vite";

export default defineConfig({
  base: "/",
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 2000 },
});
