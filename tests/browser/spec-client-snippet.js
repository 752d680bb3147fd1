es.onmessage = (event) => {
  const data = JSON.parse(event.data);
  
  if (data.type === 'error' && data.error.includes('shutdown')) {
    console.log('Server is shutting down');
    // Handle graceful disconnection
  }
  
  if (data.type === 'done') {
    es.close();
    // Clean up resources
  }
};
