// Starts Swagger UI on this server's API document (a file, not an inline script, so that the
// page's Content-Security-Policy can forbid inline scripts).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: true,
  // The default asks validator.swagger.io about the document: no request leaves this server.
  validatorUrl: null,
  displayRequestDuration: true,
});
