/* Scroll hints for wide tables and equations (styles: book/_static/trustmae.css).
 *
 * Every scroll box of the article (.pst-scrollable-table-container, notebook and glued outputs, displayed
 * equations) that is wider than the column is wrapped in a .tm-scroll-frame and marked .tm-scrolls; the frame
 * shows a fade on the side that has more to see. A long inline formula is only marked (its scroll bar shows). MathJax typesets after load, so boxes are checked again when
 * it is done and whenever the window is resized. Short cells of output tables are kept on one line.
 */
(() => {
  const BOXES = [
    ".bd-article .pst-scrollable-table-container",
    ".bd-article div.cell_output .output",
    ".bd-article div.output.text_html",
    ".bd-article div.math > mjx-container",
    ".bd-article div.math > .tm-scroll-frame > mjx-container", // once wrapped
    ".bd-article span.math", // inline: marked, not wrapped
  ].join(",");
  const SHORT_CELL = 24; // characters

  function frameOf(box) {
    const parent = box.parentElement;
    if (parent && parent.classList.contains("tm-scroll-frame")) return parent;
    const frame = document.createElement("div");
    frame.className = "tm-scroll-frame";
    box.parentNode.insertBefore(frame, box);
    frame.appendChild(box);
    box.addEventListener("scroll", () => hint(box), { passive: true });
    return frame;
  }

  function hint(box) {
    const wide = box.scrollWidth > box.clientWidth + 1;
    if (!wide && !box.classList.contains("tm-scrolls")) return;
    if (box.tagName === "SPAN") {
      box.classList.toggle("tm-scrolls", wide); // inline: its scroll bar is the hint
      return;
    }
    const frame = frameOf(box);
    box.classList.toggle("tm-scrolls", wide);
    frame.classList.toggle("tm-more-left", wide && box.scrollLeft > 1);
    frame.classList.toggle("tm-more-right", wide && box.scrollLeft + box.clientWidth < box.scrollWidth - 1);
  }

  // Short body cells (numbers, labels) keep to one line; long text cells and column headers wrap as before.
  function noWrapShortCells() {
    document.querySelectorAll(".bd-article .output table :is(td, tbody th)").forEach((cell) => {
      if (cell.textContent.trim().length <= SHORT_CELL) cell.classList.add("tm-nowrap");
    });
  }

  function check() {
    document.querySelectorAll(BOXES).forEach(hint); // nested boxes: the one that overflows gets the hint
  }

  document.addEventListener("DOMContentLoaded", () => {
    noWrapShortCells();
    check();
  });
  window.addEventListener("load", () => {
    check();
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) mj.startup.promise.then(check);
  });
  let pending = null;
  window.addEventListener("resize", () => {
    clearTimeout(pending);
    pending = setTimeout(check, 100);
  });
})();
