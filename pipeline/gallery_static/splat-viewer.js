// A small WebGL2 viewer for 3D Gaussian splats (part of modedreamer-ray, Apache-2.0).
//
// Input: the gallery's splat records, 32 bytes per Gaussian (pipeline/gallery.py SPLAT_RECORD):
// position float32 x3, linear scale float32 x3, RGBA uint8 x4 (colour = SH band 0, alpha =
// opacity), rotation quaternion w x y z as uint8 x4 (q * 128 + 128).
//
// Rendering follows 3DGS / gsplat (the project's rasterisers): each Gaussian's 3D covariance
// R S S^T R^T is projected with the Jacobian of the pinhole camera (EWA), 0.3 px^2 is added to
// the 2D covariance's diagonal, and a screen-space quad out to 3 sigma is shaded with
// alpha = opacity * exp(-d^2 / 2), composited back to front after a depth sort on the CPU.
// The camera orbits the origin in the project's z-up world (elevation, azimuth, distance, fovy
// as stages/scene/cameras.py): drag to orbit, wheel to zoom.
(function () {
  "use strict";
  var ROW = 1024; // Gaussians per texture row (4 RGBA32F texels each)

  var VERTEX = [
    "#version 300 es",
    "precision highp float; precision highp int; precision highp usampler2D;",
    "uniform highp sampler2D u_data;",
    "uniform mat4 u_view; uniform mat4 u_proj; uniform float u_focal; uniform vec2 u_viewport;",
    "in vec2 a_corner; in uint a_index;",
    "out vec4 v_color; out vec2 v_offset;",
    "void main() {",
    "  ivec2 base = ivec2(int(a_index % " + ROW + "u) * 4, int(a_index / " + ROW + "u));",
    "  vec3 center = texelFetch(u_data, base, 0).xyz;",
    "  vec3 c0 = texelFetch(u_data, base + ivec2(1, 0), 0).xyz;",
    "  vec3 c1 = texelFetch(u_data, base + ivec2(2, 0), 0).xyz;",
    "  vec4 color = texelFetch(u_data, base + ivec2(3, 0), 0);",
    "  vec4 cam = u_view * vec4(center, 1.0);",
    "  vec4 clip = u_proj * cam;",
    "  float bound = 1.3 * clip.w;",
    "  if (cam.z > -0.01 || abs(clip.x) > bound || abs(clip.y) > bound) { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); return; }",
    "  float z = -cam.z;",
    "  mat3 J = mat3(u_focal / z, 0.0, 0.0,  0.0, u_focal / z, 0.0,  u_focal * cam.x / (z * z), u_focal * cam.y / (z * z), 0.0);",
    "  mat3 sigma = mat3(c0.x, c0.y, c0.z,  c0.y, c1.x, c1.y,  c0.z, c1.y, c1.z);",
    "  mat3 T = J * mat3(u_view);",
    "  mat3 cov = T * sigma * transpose(T);",
    "  float a = cov[0][0] + 0.3, b = cov[0][1], d = cov[1][1] + 0.3;",
    "  float mid = 0.5 * (a + d), spread = length(vec2(0.5 * (a - d), b));",
    "  float l1 = mid + spread, l2 = mid - spread;",
    "  if (l2 <= 0.0) { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); return; }",
    "  vec2 e1 = abs(b) > 1e-9 ? normalize(vec2(b, l1 - a)) : (a >= d ? vec2(1.0, 0.0) : vec2(0.0, 1.0));",
    "  vec2 e2 = vec2(-e1.y, e1.x);",
    "  v_offset = 3.0 * a_corner;",
    "  vec2 pixels = v_offset.x * sqrt(l1) * e1 + v_offset.y * sqrt(l2) * e2;",
    "  v_color = color;",
    "  gl_Position = vec4(clip.xy / clip.w + 2.0 * pixels / u_viewport, 0.0, 1.0);",
    "}",
  ].join("\n");

  var FRAGMENT = [
    "#version 300 es",
    "precision highp float;",
    "in vec4 v_color; in vec2 v_offset; out vec4 fragColor;",
    "void main() {",
    "  float r2 = dot(v_offset, v_offset);",
    "  if (r2 > 9.0) discard;",
    "  float alpha = min(0.999, v_color.a * exp(-0.5 * r2));",
    "  if (alpha < 1.0 / 255.0) discard;",
    "  fragColor = vec4(v_color.rgb * alpha, alpha);",
    "}",
  ].join("\n");

  function compile(gl, type, source) {
    var shader = gl.createShader(type);
    gl.shaderSource(shader, source);
    gl.compileShader(shader);
    if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) { throw new Error(gl.getShaderInfoLog(shader)); }
    return shader;
  }

  // Per Gaussian: 4 texels = centre, covariance (xx xy xz), covariance (yy yz zz), colour.
  function decode(bytes) {
    var count = Math.floor(bytes.byteLength / 32);
    var view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    var rows = Math.max(1, Math.ceil(count / ROW));
    var texels = new Float32Array(ROW * 4 * rows * 4);
    var centers = new Float32Array(count * 3);
    for (var i = 0; i < count; i++) {
      var o = 32 * i, t = 16 * i;
      var x = view.getFloat32(o, true), y = view.getFloat32(o + 4, true), z = view.getFloat32(o + 8, true);
      var sx = view.getFloat32(o + 12, true), sy = view.getFloat32(o + 16, true), sz = view.getFloat32(o + 20, true);
      var w = (bytes[o + 28] - 128) / 128, qx = (bytes[o + 29] - 128) / 128, qy = (bytes[o + 30] - 128) / 128, qz = (bytes[o + 31] - 128) / 128;
      var n = Math.hypot(w, qx, qy, qz) || 1;
      w /= n; qx /= n; qy /= n; qz /= n;
      // R (row-major) of the unit quaternion w x y z, then M = R S and Sigma = M M^T
      var r = [
        1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - w * qz), 2 * (qx * qz + w * qy),
        2 * (qx * qy + w * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - w * qx),
        2 * (qx * qz - w * qy), 2 * (qy * qz + w * qx), 1 - 2 * (qx * qx + qy * qy),
      ];
      var m = [r[0] * sx, r[1] * sy, r[2] * sz, r[3] * sx, r[4] * sy, r[5] * sz, r[6] * sx, r[7] * sy, r[8] * sz];
      texels.set([x, y, z, 0,
        m[0] * m[0] + m[1] * m[1] + m[2] * m[2], m[0] * m[3] + m[1] * m[4] + m[2] * m[5], m[0] * m[6] + m[1] * m[7] + m[2] * m[8], 0,
        m[3] * m[3] + m[4] * m[4] + m[5] * m[5], m[3] * m[6] + m[4] * m[7] + m[5] * m[8], m[6] * m[6] + m[7] * m[7] + m[8] * m[8], 0,
        bytes[o + 24] / 255, bytes[o + 25] / 255, bytes[o + 26] / 255, bytes[o + 27] / 255], t);
      centers[3 * i] = x; centers[3 * i + 1] = y; centers[3 * i + 2] = z;
    }
    return { count: count, rows: rows, texels: texels, centers: centers };
  }

  // Column-major 4x4 world -> camera for a camera on the z-up orbit, looking at the origin.
  function viewMatrix(camera) {
    var e = camera.elevation * Math.PI / 180, a = camera.azimuth * Math.PI / 180, d = camera.distance;
    var eye = [d * Math.cos(e) * Math.cos(a), d * Math.cos(e) * Math.sin(a), d * Math.sin(e)];
    var f = [-eye[0] / d, -eye[1] / d, -eye[2] / d];
    var right = [f[1] * 1 - f[2] * 0, f[2] * 0 - f[0] * 1, f[0] * 0 - f[1] * 0]; // f x up(0,0,1)
    var rn = Math.hypot(right[0], right[1], right[2]) || 1;
    right = [right[0] / rn, right[1] / rn, right[2] / rn];
    var up = [right[1] * f[2] - right[2] * f[1], right[2] * f[0] - right[0] * f[2], right[0] * f[1] - right[1] * f[0]];
    function dot(u, v) { return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]; }
    return new Float32Array([
      right[0], up[0], -f[0], 0,
      right[1], up[1], -f[1], 0,
      right[2], up[2], -f[2], 0,
      -dot(right, eye), -dot(up, eye), dot(f, eye), 1,
    ]);
  }

  function projection(fovy, aspect, near, far) {
    var f = 1 / Math.tan(fovy * Math.PI / 360);
    return new Float32Array([f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) / (near - far), -1, 0, 0, 2 * far * near / (near - far), 0]);
  }

  // Back-to-front order by camera depth: a 16-bit counting sort.
  function sortIndices(splats, view, order) {
    var n = splats.count, depth = new Float32Array(n), min = Infinity, max = -Infinity, c = splats.centers;
    for (var i = 0; i < n; i++) {
      var z = -(view[2] * c[3 * i] + view[6] * c[3 * i + 1] + view[10] * c[3 * i + 2] + view[14]);
      depth[i] = z; if (z < min) { min = z; } if (z > max) { max = z; }
    }
    var scale = max > min ? 65535 / (max - min) : 0, counts = new Uint32Array(65536), keys = new Uint16Array(n);
    for (i = 0; i < n; i++) { keys[i] = 65535 - Math.round((depth[i] - min) * scale); counts[keys[i]]++; }
    for (var k = 1; k < 65536; k++) { counts[k] += counts[k - 1]; }
    for (i = n - 1; i >= 0; i--) { order[--counts[keys[i]]] = i; }
    return order;
  }

  function create(canvas, bytes, camera) {
    var gl = canvas.getContext("webgl2", { antialias: false, premultipliedAlpha: true, preserveDrawingBuffer: true });
    if (!gl) { throw new Error("this browser has no WebGL2: download the PLY and open it in a splat viewer"); }
    var splats = decode(bytes);
    var program = gl.createProgram();
    gl.attachShader(program, compile(gl, gl.VERTEX_SHADER, VERTEX));
    gl.attachShader(program, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT));
    gl.linkProgram(program);
    if (!gl.getProgramParameter(program, gl.LINK_STATUS)) { throw new Error(gl.getProgramInfoLog(program)); }
    gl.useProgram(program);

    var texture = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, texture);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA32F, ROW * 4, splats.rows, 0, gl.RGBA, gl.FLOAT, splats.texels);

    var vao = gl.createVertexArray();
    gl.bindVertexArray(vao);
    var corners = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, corners);
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
    var cornerLoc = gl.getAttribLocation(program, "a_corner");
    gl.enableVertexAttribArray(cornerLoc);
    gl.vertexAttribPointer(cornerLoc, 2, gl.FLOAT, false, 0, 0);
    var indices = gl.createBuffer(), order = new Uint32Array(splats.count);
    gl.bindBuffer(gl.ARRAY_BUFFER, indices);
    var indexLoc = gl.getAttribLocation(program, "a_index");
    gl.enableVertexAttribArray(indexLoc);
    gl.vertexAttribIPointer(indexLoc, 1, gl.UNSIGNED_INT, 0, 0);
    gl.vertexAttribDivisor(indexLoc, 1);

    var uniforms = {};
    ["u_data", "u_view", "u_proj", "u_focal", "u_viewport"].forEach(function (name) { uniforms[name] = gl.getUniformLocation(program, name); });
    gl.uniform1i(uniforms.u_data, 0);
    gl.disable(gl.DEPTH_TEST);
    gl.enable(gl.BLEND);
    gl.blendFunc(gl.ONE, gl.ONE_MINUS_SRC_ALPHA);

    var cam = { elevation: camera.elevation, azimuth: camera.azimuth || 0, distance: camera.distance, fovy: camera.fovy };
    var frames = 0, pending = false, disposed = false;

    function fit() { // draw at the canvas' displayed size (device pixels)
      var ratio = window.devicePixelRatio || 1;
      var w = Math.round(canvas.clientWidth * ratio), h = Math.round(canvas.clientHeight * ratio);
      if (w > 0 && h > 0 && (w !== canvas.width || h !== canvas.height)) { canvas.width = w; canvas.height = h; }
    }

    function render() {
      pending = false;
      if (disposed) { return; }
      fit();
      var width = canvas.width, height = canvas.height;
      gl.viewport(0, 0, width, height);
      gl.clearColor(0.914, 0.925, 0.945, 1.0);
      gl.clear(gl.COLOR_BUFFER_BIT);
      var view = viewMatrix(cam);
      gl.uniformMatrix4fv(uniforms.u_view, false, view);
      gl.uniformMatrix4fv(uniforms.u_proj, false, projection(cam.fovy, width / height, 0.01, 100));
      gl.uniform1f(uniforms.u_focal, 0.5 * height / Math.tan(cam.fovy * Math.PI / 360));
      gl.uniform2f(uniforms.u_viewport, width, height);
      gl.bindBuffer(gl.ARRAY_BUFFER, indices);
      gl.bufferData(gl.ARRAY_BUFFER, sortIndices(splats, view, order), gl.DYNAMIC_DRAW);
      gl.drawArraysInstanced(gl.TRIANGLE_STRIP, 0, 4, splats.count);
      frames++;
    }
    function request() { if (!pending) { pending = true; window.requestAnimationFrame(render); } }

    var drag = null;
    function down(event) { drag = [event.clientX, event.clientY]; canvas.setPointerCapture(event.pointerId); }
    function move(event) {
      if (!drag) { return; }
      cam.azimuth -= 0.4 * (event.clientX - drag[0]);
      cam.elevation = Math.max(-89, Math.min(89, cam.elevation + 0.4 * (event.clientY - drag[1])));
      drag = [event.clientX, event.clientY];
      request();
    }
    function up() { drag = null; }
    function wheel(event) { event.preventDefault(); cam.distance *= Math.exp(0.001 * event.deltaY); request(); }
    canvas.addEventListener("pointerdown", down);
    canvas.addEventListener("pointermove", move);
    canvas.addEventListener("pointerup", up);
    canvas.addEventListener("wheel", wheel, { passive: false });
    render();

    return {
      count: splats.count,
      camera: cam,
      render: render,
      frames: function () { return frames; },
      setCamera: function (values) { Object.assign(cam, values); render(); },
      pixels: function () {
        var out = new Uint8Array(canvas.width * canvas.height * 4);
        gl.readPixels(0, 0, canvas.width, canvas.height, gl.RGBA, gl.UNSIGNED_BYTE, out);
        return out; // bottom row first (GL order)
      },
      dispose: function () {
        disposed = true;
        canvas.removeEventListener("pointerdown", down);
        canvas.removeEventListener("pointermove", move);
        canvas.removeEventListener("pointerup", up);
        canvas.removeEventListener("wheel", wheel);
        gl.deleteTexture(texture); gl.deleteBuffer(corners); gl.deleteBuffer(indices);
        gl.deleteVertexArray(vao); gl.deleteProgram(program);
      },
    };
  }

  window.SplatViewer = { create: create, decode: decode, viewMatrix: viewMatrix };
})();
