// The Extras tab (A1111's "Extras": upscale one image or a batch of uploads through /sdapi/v1/extra-single-image
// and /extra-batch-images) and the "Send to extras" buttons under the txt2img / img2img galleries. Loaded after
// app.js, whose helpers ($, api, fillSelect, readFile, switchTab, selectedImage) it uses. Element ids follow A1111's.
"use strict";

const extras = { images: [], selected: 0, single: null };

const EXTRAS_HTML = `
  <div class="columns">
    <div class="column settings">
      <div class="radio" id="extras_mode">
        <label><input type="radio" name="extras_mode" value="single" checked> Single Image</label>
        <label><input type="radio" name="extras_mode" value="batch"> Batch Process</label>
      </div>
      <div class="dropzone" id="extras_image">
        <input type="file" accept="image/*" id="extras_file">
        <img id="extras_input" alt="" hidden>
        <span class="hint">Drop an image here or click to choose one</span>
      </div>
      <div class="dropzone" id="extras_batch" hidden>
        <input type="file" accept="image/*" id="extras_batch_files" multiple>
        <span class="hint" id="extras_batch_hint">Drop images here or click to choose several</span>
      </div>
      <div class="radio" id="extras_resize_mode">
        <label><input type="radio" name="extras_resize_mode" value="0" checked> Scale by</label>
        <label><input type="radio" name="extras_resize_mode" value="1"> Scale to</label>
      </div>
      <label class="slider extras-scale-by">Resize
        <input type="range" id="extras_upscaling_resize" min="1" max="8" step="0.05" value="4">
        <input type="number" min="1" max="8" step="0.05" value="4"></label>
      <div class="row extras-scale-to" hidden>
        <label>Width <input type="number" id="extras_upscaling_resize_w" min="1" step="8" value="512"></label>
        <label>Height <input type="number" id="extras_upscaling_resize_h" min="1" step="8" value="512"></label>
        <label class="check"><input type="checkbox" id="extras_upscaling_crop" checked> Crop to fit</label>
      </div>
      <div class="row">
        <label>Upscaler 1 <select id="extras_upscaler_1"></select></label>
        <label>Upscaler 2 <select id="extras_upscaler_2"></select></label>
      </div>
      <label class="slider">Upscaler 2 visibility
        <input type="range" id="extras_upscaler_2_visibility" min="0" max="1" step="0.001" value="0">
        <input type="number" min="0" max="1" step="0.001" value="0"></label>
      <div class="buttons"><button id="extras_generate" class="primary">Generate</button></div>
    </div>
    <div class="column output">
      <div id="extras_gallery" class="gallery">
        <img class="selected-image" alt="" hidden>
        <div class="thumbnails"></div>
      </div>
      <div id="extras_html_info" class="infotext"></div>
      <div id="extras_html_log" class="log"></div>
    </div>
  </div>`;

function buildExtrasTab() {
  const button = document.createElement("button");
  Object.assign(button, { className: "tab", id: "tab_extras_button", textContent: "Extras" });
  button.dataset.tab = "extras";
  $("tab_pnginfo_button").before(button);
  button.addEventListener("click", () => switchTab("extras"));
  const page = document.createElement("section");
  Object.assign(page, { id: "tab_extras", className: "tab-page", hidden: true, innerHTML: EXTRAS_HTML });
  $("tab_pnginfo").before(page);
  linkSliders(page);
}

function extrasPayload() {
  return {
    resize_mode: Number(radio("extras_resize_mode")), upscaling_resize: number("extras_upscaling_resize"),
    upscaling_resize_w: number("extras_upscaling_resize_w"), upscaling_resize_h: number("extras_upscaling_resize_h"),
    upscaling_crop: $("extras_upscaling_crop").checked, upscaler_1: $("extras_upscaler_1").value,
    upscaler_2: $("extras_upscaler_2").value,
    extras_upscaler_2_visibility: number("extras_upscaler_2_visibility"),
  };
}

function showExtrasResults(index) {
  const gallery = $("extras_gallery");
  const thumbnails = gallery.querySelector(".thumbnails"), big = gallery.querySelector(".selected-image");
  thumbnails.innerHTML = "";
  extras.images.forEach((image, i) => {
    const thumbnail = document.createElement("img");
    thumbnail.src = `data:image/png;base64,${image}`;
    thumbnail.classList.toggle("selected", i === index);
    thumbnail.addEventListener("click", () => showExtrasResults(i));
    thumbnails.appendChild(thumbnail);
  });
  extras.selected = index;
  big.hidden = !extras.images.length;
  if (extras.images.length) big.src = `data:image/png;base64,${extras.images[index]}`;
}

async function runExtras() {
  const log = $("extras_html_log"), info = $("extras_html_info");
  log.textContent = "";
  const batch = radio("extras_mode") === "batch";
  try {
    let response;
    if (batch) {
      const files = [...$("extras_batch_files").files];
      if (!files.length) throw new Error("Choose one or more images first.");
      const imageList = await Promise.all(files.map(async (file) => ({ data: await readFile(file), name: file.name })));
      response = await api("POST", "/sdapi/v1/extra-batch-images", { ...extrasPayload(), imageList });
      extras.images = response.images;
    } else {
      if (!extras.single) throw new Error("Choose an image first.");
      response = await api("POST", "/sdapi/v1/extra-single-image", { ...extrasPayload(), image: extras.single });
      extras.images = [response.image];
    }
    info.innerHTML = response.html_info;  // the server's escaped HTML (A1111's plaintext_to_html)
    showExtrasResults(0);
  } catch (error) {
    log.textContent = error.message;
  }
}

function setExtrasImage(dataUrl) {
  extras.single = dataUrl;
  $("extras_input").src = dataUrl;
  $("extras_input").hidden = false;
  $("extras_image").classList.add("has-image");
}

async function setupExtras() {
  buildExtrasTab();
  const names = (await api("GET", "/sdapi/v1/upscalers")).map((upscaler) => upscaler.name);
  fillSelect($("extras_upscaler_1"), names, "None");
  fillSelect($("extras_upscaler_2"), names, "None");
  document.querySelectorAll('input[name="extras_mode"]').forEach((input) => input.addEventListener("change", () => {
    const batch = radio("extras_mode") === "batch";
    $("extras_image").hidden = batch;
    $("extras_batch").hidden = !batch;
  }));
  document.querySelectorAll('input[name="extras_resize_mode"]').forEach((input) => {
    input.addEventListener("change", () => {
      const to = radio("extras_resize_mode") === "1";
      document.querySelector("#tab_extras .extras-scale-by").hidden = to;
      document.querySelector("#tab_extras .extras-scale-to").hidden = !to;
    });
  });
  $("extras_file").addEventListener("change", async (event) => {
    if (event.target.files.length) setExtrasImage(await readFile(event.target.files[0]));
  });
  $("extras_batch_files").addEventListener("change", (event) => {
    $("extras_batch_hint").textContent = `${event.target.files.length} image(s) chosen`;
  });
  $("extras_generate").addEventListener("click", runExtras);
  // "Send to extras" under both generation galleries (A1111's txt2img_send_to_extras / img2img_send_to_extras).
  for (const tab of ["txt2img", "img2img"]) {
    const send = document.createElement("button");
    Object.assign(send, { id: `${tab}_send_to_extras`, textContent: "Send to extras" });
    $(`${tab}_send_to_inpaint`).after(send);
    send.addEventListener("click", () => {
      const image = selectedImage(tab);
      if (!image) return;
      setExtrasImage(`data:image/png;base64,${image}`);
      document.querySelector('input[name="extras_mode"][value="single"]').click();
      switchTab("extras");
    });
  }
  document.body.dataset.extrasReady = "true";  // for tests: the tab is built and wired
}

setupExtras().catch((error) => {
  document.body.dataset.extrasReady = "error";
  console.error("The Extras tab could not start:", error);
});
