// A client the project did not write: @grpc/grpc-js + @grpc/proto-loader against the
// running service. Run by tests/test_query_node_client.py; prints one JSON object.
// Env: VIDSEARCH_ADDRESS (host:port), VIDSEARCH_APP (Serve app), PROTO_DIR (protos/).
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const definition = protoLoader.loadSync("vidsearch/v1/search.proto", {
  includeDirs: [process.env.PROTO_DIR], keepCase: true, defaults: true, oneofs: true,
});
const { SearchService } = grpc.loadPackageDefinition(definition).vidsearch.v1;
const client = new SearchService(process.env.VIDSEARCH_ADDRESS, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
metadata.set("application", process.env.VIDSEARCH_APP);
metadata.set("vidsearch-deadline-ms", "30000");

const call = (method, request) => new Promise((resolve) => {
  client[method](request, metadata, { deadline: Date.now() + 60000 }, (error, response) => {
    resolve(error ? { code: error.code, details: error.details } : { response });
  });
});

(async () => {
  const out = {};
  const search = await call("Search", {
    query: "a red clip", top_k: 5, rerank: false,
    // protobufjs bundles google/protobuf/struct.proto with camelCase field names.
    filters: [{ field: "category", equals: { stringValue: "sports" } }],
  });
  out.search = search.response ? search.response.results.map((r) => ({
    video_id: r.video_id, title: r.summary.title, tags: r.summary.tags, duration_s: r.summary.duration_s,
    moment: r.best_moment_seconds, notice: r.payload_notice,
  })) : search;
  const first = out.search[0] && out.search[0].video_id;
  const video = await call("GetVideo", { video_id: first });
  out.get_video = video.response ? { video_id: video.response.video_id, title: video.response.summary.title,
                                     uri: video.response.summary.uri } : video;
  // Three bad inputs, each with its status code.
  out.bad = {
    top_k: (await call("Search", { query: "x", top_k: 101 })),
    unknown_field: (await call("Search", { query: "x", filters: [{ field: "nope", equals: { stringValue: "a" } }] })),
    // struct.proto's own spelling is unknown to protobufjs: the Value arrives empty and
    // is refused with a hint, never silently dropped.
    empty_value: (await call("Search", { query: "x", filters: [{ field: "category", equals: { string_value: "a" } }] })),
    missing_video: (await call("GetVideo", { video_id: "no-such-video" })),
  };
  console.log(JSON.stringify(out));
  client.close();
})();
